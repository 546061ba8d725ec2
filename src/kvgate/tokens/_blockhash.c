/*
 * Native fast path for kvgate.tokens.hashing: local and sequence block hashes of a token list in
 * one call. The pure-Python implementation in hashing.py is the specification; this module must
 * return exactly the same values (property-tested) and only exists because the per-block Python
 * overhead (~0.3 us per block) dominates routing latency for long prompts.
 *
 * xxh3 itself comes from the system's libxxhash (Debian libxxhash0), declared here so that no
 * development header is needed to build.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

extern uint64_t XXH3_64bits_withSeed(const void *data, size_t len, uint64_t seed);

#define SEQUENCE_SEED 1337ULL

static inline uint32_t to_le32(uint32_t v) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    return __builtin_bswap32(v);
#else
    return v;
#endif
}

static inline uint64_t to_le64(uint64_t v) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    return __builtin_bswap64(v);
#else
    return v;
#endif
}

/* Token ids are small non-negative ints, which CPython stores "compact" (one digit): read them
 * without the general conversion's checks. Anything else takes the general path. */
static inline int compact_u32(PyObject *item, unsigned long *out) {
    if (!PyLong_CheckExact(item)) return 0;
#if PY_VERSION_HEX >= 0x030C0000
    if (!PyUnstable_Long_IsCompact((PyLongObject *)item)) return 0;
    Py_ssize_t value = PyUnstable_Long_CompactValue((PyLongObject *)item);
    if (value < 0 || value > 0xFFFFFFFFL) return 0;
    *out = (unsigned long)value;
    return 1;
#else
    Py_ssize_t size = Py_SIZE(item);
    if (size == 0) {
        *out = 0;
        return 1;
    }
    if (size != 1) return 0;
    *out = (unsigned long)((PyLongObject *)item)->ob_digit[0];
    return 1;
#endif
}

static PyObject *hash_blocks(PyObject *self, PyObject *args) {
    PyObject *tokens_obj;
    Py_ssize_t block_size;
    unsigned long long seed;
    PyObject *parent_obj;
    int with_local = 1;
    if (!PyArg_ParseTuple(args, "OnKO|p", &tokens_obj, &block_size, &seed, &parent_obj,
                          &with_local)) {
        return NULL;
    }
    if (block_size <= 0) {
        PyErr_SetString(PyExc_ValueError, "block_size must be positive");
        return NULL;
    }
    int has_parent = parent_obj != Py_None;
    uint64_t parent = 0;
    if (has_parent) {
        parent = PyLong_AsUnsignedLongLong(parent_obj);
        if (parent == (uint64_t)-1 && PyErr_Occurred()) {
            return NULL;
        }
    }
    PyObject *seq = PySequence_Fast(tokens_obj, "tokens must be a sequence of ints");
    if (seq == NULL) {
        return NULL;
    }
    Py_ssize_t blocks = PySequence_Fast_GET_SIZE(seq) / block_size;
    Py_ssize_t count = blocks * block_size;
    uint32_t *buf = NULL;
    uint64_t *out = NULL;
    PyObject *local_list = NULL, *seq_list = NULL;
    if (blocks > 0) {
        buf = PyMem_Malloc((size_t)count * sizeof(uint32_t));
        out = PyMem_Malloc((size_t)blocks * 2 * sizeof(uint64_t));
        if (buf == NULL || out == NULL) {
            PyErr_NoMemory();
            goto fail;
        }
    }
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = items[i];
        unsigned long v;
        if (compact_u32(item, &v)) {
            buf[i] = to_le32((uint32_t)v);
            continue;
        }
        if (PyLong_Check(item)) {
            v = PyLong_AsUnsignedLong(item);
        } else {
            /* numpy integers and other __index__ types, which the Python path accepts too; a
             * non-integer keeps its TypeError, as in the Python path. */
            PyObject *index = PyNumber_Index(item);
            if (index == NULL) {
                goto fail;
            }
            v = PyLong_AsUnsignedLong(index);
            Py_DECREF(index);
        }
        if ((v == (unsigned long)-1 && PyErr_Occurred()) || v > 0xFFFFFFFFUL) {
            if (PyErr_Occurred() && !PyErr_ExceptionMatches(PyExc_OverflowError)) {
                goto fail;
            }
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "token id at position %zd is not a u32", i);
            goto fail;
        }
        buf[i] = to_le32((uint32_t)v);
    }
    if (blocks > 0) {
        size_t block_bytes = (size_t)block_size * sizeof(uint32_t);
        Py_BEGIN_ALLOW_THREADS
        uint64_t prev = parent;
        uint64_t pair[2];
        for (Py_ssize_t b = 0; b < blocks; b++) {
            uint64_t local = XXH3_64bits_withSeed(buf + b * block_size, block_bytes, seed);
            out[b] = local;
            if (b == 0 && !has_parent) {
                prev = local;
            } else {
                pair[0] = to_le64(prev);
                pair[1] = to_le64(local);
                prev = XXH3_64bits_withSeed(pair, sizeof(pair), SEQUENCE_SEED);
            }
            out[blocks + b] = prev;
        }
        Py_END_ALLOW_THREADS
    }
    /* The request path needs only the sequence hashes; building the local ones as Python ints
     * would double the allocations. Without them, None stands in their place. */
    seq_list = PyList_New(blocks);
    if (seq_list == NULL) {
        goto fail;
    }
    if (with_local) {
        local_list = PyList_New(blocks);
        if (local_list == NULL) {
            goto fail;
        }
    }
    for (Py_ssize_t b = 0; b < blocks; b++) {
        PyObject *s = PyLong_FromUnsignedLongLong(out[blocks + b]);
        if (s == NULL) {
            goto fail;
        }
        PyList_SET_ITEM(seq_list, b, s);
        if (local_list != NULL) {
            PyObject *l = PyLong_FromUnsignedLongLong(out[b]);
            if (l == NULL) {
                goto fail;
            }
            PyList_SET_ITEM(local_list, b, l);
        }
    }
    PyMem_Free(buf);
    PyMem_Free(out);
    Py_DECREF(seq);
    if (local_list == NULL) {
        Py_INCREF(Py_None);
        local_list = Py_None;
    }
    return Py_BuildValue("(NN)", local_list, seq_list);

fail:
    PyMem_Free(buf);
    PyMem_Free(out);
    Py_XDECREF(local_list);
    Py_XDECREF(seq_list);
    Py_DECREF(seq);
    return NULL;
}

static PyMethodDef methods[] = {
    {"hash_blocks", hash_blocks, METH_VARARGS,
     "hash_blocks(tokens, block_size, seed, parent) -> (local_hashes, sequence_hashes)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_blockhash", NULL, -1, methods,
};

PyMODINIT_FUNC PyInit__blockhash(void) { return PyModule_Create(&module); }
