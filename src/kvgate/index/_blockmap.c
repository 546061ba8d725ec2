/* BlockMap: an insertion-ordered map from u64 to u64, the per-worker "engine block id -> sequence
 * hash" table of the prefix index, at ~30 bytes an entry instead of a dict's ~80 (a dict entry plus
 * the key's int object).
 *
 * It behaves as the dict it replaces for the operations the index uses: m[k] = v (an existing key
 * keeps its place), m.get(k), k in m, m.pop(k, default), len(m), m.popitem() (the newest entry),
 * m.values() and m.items() (insertion order). Keys and values outside [0, 2**64) raise
 * OverflowError; the index then keeps that worker in a dict instead.
 *
 * Layout (CPython's compact dict, specialised): entries are appended to an array of (key, value)
 * with a liveness byte; an open-addressed table of int32 indices (linear probing, at most half
 * full) finds them. Deleted entries leave a tombstone until the next rebuild, which compacts.
 * Memory comes from PyMem_*, so tracemalloc (kvgate microbench's memory figure) sees it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define EMPTY (-1)
#define DUMMY (-2)

typedef struct {
    uint64_t key;
    uint64_t value;
} Entry;

typedef struct {
    PyObject_HEAD
    Entry *entries;
    uint8_t *alive;
    int32_t *index;
    Py_ssize_t capacity; /* entries allocated */
    Py_ssize_t next;     /* entries used, tombstones included */
    Py_ssize_t used;     /* live entries */
    Py_ssize_t filled;   /* index slots not EMPTY: live entries and tombstones */
    Py_ssize_t slots;    /* index size, a power of two, >= 2 * capacity */
} BlockMap;

static inline uint64_t mix(uint64_t x) {
    /* splitmix64's finaliser: engine ids are often sequential, and the index is masked. */
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static int as_u64(PyObject *obj, uint64_t *out) {
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "BlockMap keys and values are ints, not %.100s",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    uint64_t v = PyLong_AsUnsignedLongLong(obj);
    if (v == (uint64_t)-1 && PyErr_Occurred()) return -1;
    *out = v;
    return 0;
}

/* Position in the index of ``key``'s slot, or of the empty slot ending its probe. */
static Py_ssize_t probe(const BlockMap *m, uint64_t key) {
    size_t mask = (size_t)m->slots - 1;
    size_t i = (size_t)mix(key) & mask;
    for (;;) {
        int32_t ix = m->index[i];
        if (ix == EMPTY) return (Py_ssize_t)i;
        if (ix >= 0 && m->entries[ix].key == key) return (Py_ssize_t)i;
        i = (i + 1) & mask;
    }
}

static int rebuild(BlockMap *m, Py_ssize_t capacity) {
    /* Compact the live entries into arrays of ``capacity`` and re-index them. */
    Py_ssize_t slots = 8;
    while (slots < 2 * capacity) slots <<= 1;
    Entry *entries = PyMem_Malloc(sizeof(Entry) * (size_t)capacity);
    uint8_t *alive = PyMem_Malloc((size_t)capacity);
    int32_t *index = PyMem_Malloc(sizeof(int32_t) * (size_t)slots);
    if (entries == NULL || alive == NULL || index == NULL) {
        PyMem_Free(entries);
        PyMem_Free(alive);
        PyMem_Free(index);
        PyErr_NoMemory();
        return -1;
    }
    memset(index, 0xff, sizeof(int32_t) * (size_t)slots); /* EMPTY */
    Py_ssize_t n = 0;
    size_t mask = (size_t)slots - 1;
    for (Py_ssize_t i = 0; i < m->next; i++) {
        if (!m->alive[i]) continue;
        entries[n] = m->entries[i];
        alive[n] = 1;
        size_t s = (size_t)mix(entries[n].key) & mask;
        while (index[s] != EMPTY) s = (s + 1) & mask;
        index[s] = (int32_t)n;
        n++;
    }
    PyMem_Free(m->entries);
    PyMem_Free(m->alive);
    PyMem_Free(m->index);
    m->entries = entries;
    m->alive = alive;
    m->index = index;
    m->capacity = capacity;
    m->next = n;
    m->used = n;
    m->filled = n;
    m->slots = slots;
    return 0;
}

static int make_room(BlockMap *m) {
    /* Out of entries, or the index too full of tombstones for probing to stay short: compact
     * when most entries are dead, else grow (as a dict does). */
    Py_ssize_t capacity = m->used * 2 < m->capacity ? m->capacity : m->capacity * 2;
    if (capacity > INT32_MAX / 2) {
        PyErr_SetString(PyExc_OverflowError, "BlockMap is full");
        return -1;
    }
    return rebuild(m, capacity < 8 ? 8 : capacity);
}

static int set_item(BlockMap *m, uint64_t key, uint64_t value) {
    Py_ssize_t s = probe(m, key);
    int32_t ix = m->index[s];
    if (ix >= 0) {
        m->entries[ix].value = value;
        return 0;
    }
    if (m->next == m->capacity || (m->filled + 1) * 3 > m->slots * 2) {
        if (make_room(m) < 0) return -1;
        s = probe(m, key);
    }
    m->entries[m->next].key = key;
    m->entries[m->next].value = value;
    m->alive[m->next] = 1;
    m->index[s] = (int32_t)m->next;
    m->next++;
    m->used++;
    m->filled++;
    return 0;
}

/* Remove the entry at index slot ``s`` (which holds one): linear probing needs a tombstone. */
static void delete_at(BlockMap *m, Py_ssize_t s) {
    int32_t ix = m->index[s];
    m->index[s] = DUMMY;
    m->alive[ix] = 0;
    m->used--;
    while (m->next > 0 && !m->alive[m->next - 1]) m->next--;
}

static PyObject *BlockMap_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    if (PyTuple_GET_SIZE(args) != 0 || (kwds != NULL && PyDict_GET_SIZE(kwds) != 0)) {
        PyErr_SetString(PyExc_TypeError, "BlockMap() takes no arguments");
        return NULL;
    }
    BlockMap *m = (BlockMap *)type->tp_alloc(type, 0);
    if (m == NULL) return NULL;
    m->entries = NULL;
    m->alive = NULL;
    m->index = NULL;
    m->capacity = m->next = m->used = m->filled = 0;
    m->slots = 0;
    if (rebuild(m, 8) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return (PyObject *)m;
}

static void BlockMap_dealloc(BlockMap *m) {
    PyMem_Free(m->entries);
    PyMem_Free(m->alive);
    PyMem_Free(m->index);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

static Py_ssize_t BlockMap_len(BlockMap *m) { return m->used; }

/* Lookup of a Python key: 1 found (*s = slot), 0 absent (also for ints a BlockMap cannot hold),
 * -1 error. */
static int find(BlockMap *m, PyObject *key, Py_ssize_t *s) {
    uint64_t k;
    if (as_u64(key, &k) < 0) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError) ||
            PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            return 0;
        }
        return -1;
    }
    *s = probe(m, k);
    return m->index[*s] >= 0;
}

static PyObject *BlockMap_subscript(BlockMap *m, PyObject *key) {
    Py_ssize_t s;
    int found = find(m, key, &s);
    if (found < 0) return NULL;
    if (!found) {
        PyErr_SetObject(PyExc_KeyError, key);
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(m->entries[m->index[s]].value);
}

static int BlockMap_ass_subscript(BlockMap *m, PyObject *key, PyObject *value) {
    if (value == NULL) {
        Py_ssize_t s;
        int found = find(m, key, &s);
        if (found < 0) return -1;
        if (!found) {
            PyErr_SetObject(PyExc_KeyError, key);
            return -1;
        }
        delete_at(m, s);
        return 0;
    }
    uint64_t k, v;
    if (as_u64(key, &k) < 0 || as_u64(value, &v) < 0) return -1;
    return set_item(m, k, v);
}

static int BlockMap_contains(BlockMap *m, PyObject *key) {
    Py_ssize_t s;
    return find(m, key, &s);
}

static PyObject *BlockMap_get(BlockMap *m, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get(key, default=None)");
        return NULL;
    }
    Py_ssize_t s;
    int found = find(m, args[0], &s);
    if (found < 0) return NULL;
    if (found) return PyLong_FromUnsignedLongLong(m->entries[m->index[s]].value);
    PyObject *fallback = nargs == 2 ? args[1] : Py_None;
    Py_INCREF(fallback);
    return fallback;
}

static PyObject *BlockMap_pop(BlockMap *m, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "pop(key[, default])");
        return NULL;
    }
    Py_ssize_t s;
    int found = find(m, args[0], &s);
    if (found < 0) return NULL;
    if (!found) {
        if (nargs == 2) {
            Py_INCREF(args[1]);
            return args[1];
        }
        PyErr_SetObject(PyExc_KeyError, args[0]);
        return NULL;
    }
    uint64_t value = m->entries[m->index[s]].value;
    delete_at(m, s);
    return PyLong_FromUnsignedLongLong(value);
}

static PyObject *BlockMap_popitem(BlockMap *m, PyObject *Py_UNUSED(ignored)) {
    if (m->used == 0) {
        PyErr_SetString(PyExc_KeyError, "popitem(): BlockMap is empty");
        return NULL;
    }
    /* The newest live entry is the last one: delete_at trims trailing tombstones. */
    Entry last = m->entries[m->next - 1];
    PyObject *item = Py_BuildValue("(KK)", (unsigned long long)last.key,
                                   (unsigned long long)last.value);
    if (item == NULL) return NULL;
    delete_at(m, probe(m, last.key));
    return item;
}

static PyObject *BlockMap_values(BlockMap *m, PyObject *Py_UNUSED(ignored)) {
    PyObject *out = PyList_New(m->used);
    if (out == NULL) return NULL;
    Py_ssize_t n = 0;
    for (Py_ssize_t i = 0; i < m->next; i++) {
        if (!m->alive[i]) continue;
        PyObject *v = PyLong_FromUnsignedLongLong(m->entries[i].value);
        if (v == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, n++, v);
    }
    return out;
}

static PyObject *BlockMap_items(BlockMap *m, PyObject *Py_UNUSED(ignored)) {
    PyObject *out = PyList_New(m->used);
    if (out == NULL) return NULL;
    Py_ssize_t n = 0;
    for (Py_ssize_t i = 0; i < m->next; i++) {
        if (!m->alive[i]) continue;
        PyObject *item = Py_BuildValue("(KK)", (unsigned long long)m->entries[i].key,
                                       (unsigned long long)m->entries[i].value);
        if (item == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, n++, item);
    }
    return out;
}

static PyObject *BlockMap_sizeof(BlockMap *m, PyObject *Py_UNUSED(ignored)) {
    size_t bytes = sizeof(BlockMap) + (sizeof(Entry) + 1) * (size_t)m->capacity +
                   sizeof(int32_t) * (size_t)m->slots;
    return PyLong_FromSize_t(bytes);
}

static PyMethodDef BlockMap_methods[] = {
    {"get", (PyCFunction)(void (*)(void))BlockMap_get, METH_FASTCALL,
     "get(key, default=None)"},
    {"pop", (PyCFunction)(void (*)(void))BlockMap_pop, METH_FASTCALL, "pop(key[, default])"},
    {"popitem", (PyCFunction)BlockMap_popitem, METH_NOARGS, "the newest (key, value)"},
    {"values", (PyCFunction)BlockMap_values, METH_NOARGS, "values in insertion order, as a list"},
    {"items", (PyCFunction)BlockMap_items, METH_NOARGS, "(key, value) in insertion order"},
    {"__sizeof__", (PyCFunction)BlockMap_sizeof, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyMappingMethods BlockMap_as_mapping = {
    (lenfunc)BlockMap_len,
    (binaryfunc)BlockMap_subscript,
    (objobjargproc)BlockMap_ass_subscript,
};

static PySequenceMethods BlockMap_as_sequence = {
    .sq_length = (lenfunc)BlockMap_len,
    .sq_contains = (objobjproc)BlockMap_contains,
};

static PyTypeObject BlockMapType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvgate.index._blockmap.BlockMap",
    .tp_basicsize = sizeof(BlockMap),
    .tp_dealloc = (destructor)BlockMap_dealloc,
    .tp_as_mapping = &BlockMap_as_mapping,
    .tp_as_sequence = &BlockMap_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Insertion-ordered map from u64 to u64 (a compact dict for the prefix index).",
    .tp_methods = BlockMap_methods,
    .tp_new = BlockMap_new,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_blockmap", NULL, -1, NULL,
};

PyMODINIT_FUNC PyInit__blockmap(void) {
    if (PyType_Ready(&BlockMapType) < 0) return NULL;
    PyObject *mod = PyModule_Create(&module);
    if (mod == NULL) return NULL;
    Py_INCREF(&BlockMapType);
    if (PyModule_AddObject(mod, "BlockMap", (PyObject *)&BlockMapType) < 0) {
        Py_DECREF(&BlockMapType);
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
