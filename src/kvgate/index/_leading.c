/* Native inner loops of MaskIndex.
 *
 * leading_runs(blocks: dict[int, int], hashes: Sequence[int]) -> list[tuple[int, int]]
 *     find_matches: walk a request's block hashes through the index's hash -> worker-bitmask
 *     dict, AND-ing the masks; [(bits, depth), ...]: the workers in ``bits`` hold exactly the
 *     first ``depth`` blocks. Masks that fit in 64 bits (up to 64 worker slots) are AND-ed as
 *     machine words; wider ones as Python ints.
 * count_in(counts, masks, hashes, bit) / count_out(counts, masks, shared, share, hashes, bit)
 *     add_counted / release_counted: one holder more (less) of each block in ``counts``; a
 *     block's first holder sets ``bit`` in its mask, its last one clears it (the mask taken from
 *     ``shared``, else from ``share(mask)``; deleted once 0). Every block of every routed
 *     request passes here twice, ~120 per 2k-token prompt.
 *
 * Same results as the Python loops they replace (held equal by tests).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static int append_run(PyObject *runs, PyObject *bits, Py_ssize_t depth) {
    PyObject *item = Py_BuildValue("(On)", bits, depth);
    if (item == NULL) return -1;
    int rc = PyList_Append(runs, item);
    Py_DECREF(item);
    return rc;
}

/* Word path: every mask seen so far fitted in 64 bits. Returns 1 when it finished, 0 when a
 * wider mask forces the caller onto the object path at index *at, -1 on error. */
static int runs_as_words(PyObject *blocks, PyObject **items, Py_ssize_t n, PyObject *runs,
                         unsigned long long *mask_out, Py_ssize_t *at) {
    unsigned long long mask = *mask_out;
    for (Py_ssize_t i = *at; i < n; i++) {
        PyObject *value = PyDict_GetItemWithError(blocks, items[i]);
        unsigned long long got = 0;
        if (value == NULL) {
            if (PyErr_Occurred()) return -1;
        } else {
            got = PyLong_AsUnsignedLongLong(value);
            if (got == (unsigned long long)-1 && PyErr_Occurred()) {
                if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return -1;
                PyErr_Clear();
                *mask_out = mask;
                *at = i;
                return 0;
            }
        }
        unsigned long long still = mask & got;
        if (still != mask) {
            PyObject *dropped = PyLong_FromUnsignedLongLong(mask ^ still);
            if (dropped == NULL) return -1;
            int rc = append_run(runs, dropped, i);
            Py_DECREF(dropped);
            if (rc < 0) return -1;
            if (!still) {
                *mask_out = 0;
                *at = n;
                return 1;
            }
            mask = still;
        }
    }
    *mask_out = mask;
    *at = n;
    return 1;
}

static PyObject *leading_runs(PyObject *self, PyObject *args) {
    PyObject *blocks, *hashes;
    if (!PyArg_ParseTuple(args, "O!O", &PyDict_Type, &blocks, &hashes)) return NULL;
    PyObject *seq = PySequence_Fast(hashes, "hashes must be a sequence");
    if (seq == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *runs = PyList_New(0);
    PyObject *mask_obj = NULL;
    if (runs == NULL) goto fail;
    if (n == 0) goto done;

    PyObject *first = PyDict_GetItemWithError(blocks, items[0]);
    if (first == NULL) {
        if (PyErr_Occurred()) goto fail;
        goto done;
    }
    Py_ssize_t at = 1;
    unsigned long long word = PyLong_AsUnsignedLongLong(first);
    int finished = 0;
    if (word == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) goto fail;
        PyErr_Clear();
    } else {
        if (!word) goto done;
        finished = runs_as_words(blocks, items, n, runs, &word, &at);
        if (finished < 0) goto fail;
        if (finished) {
            if (word) {
                PyObject *rest = PyLong_FromUnsignedLongLong(word);
                if (rest == NULL || append_run(runs, rest, n) < 0) {
                    Py_XDECREF(rest);
                    goto fail;
                }
                Py_DECREF(rest);
            }
            goto done;
        }
    }
    /* Object path: masks wider than 64 bits (more than 64 worker slots). */
    if (at == 1 && finished == 0 && word == (unsigned long long)-1) {
        mask_obj = first;
        Py_INCREF(mask_obj);
    } else {
        mask_obj = PyLong_FromUnsignedLongLong(word);
        if (mask_obj == NULL) goto fail;
    }
    for (Py_ssize_t i = at; i < n; i++) {
        PyObject *got = PyDict_GetItemWithError(blocks, items[i]);
        if (got == NULL && PyErr_Occurred()) goto fail;
        PyObject *still = got == NULL ? PyLong_FromLong(0) : PyNumber_And(mask_obj, got);
        if (still == NULL) goto fail;
        int same = PyObject_RichCompareBool(still, mask_obj, Py_EQ);
        if (same < 0) {
            Py_DECREF(still);
            goto fail;
        }
        if (!same) {
            PyObject *dropped = PyNumber_Xor(mask_obj, still);
            if (dropped == NULL || append_run(runs, dropped, i) < 0) {
                Py_XDECREF(dropped);
                Py_DECREF(still);
                goto fail;
            }
            Py_DECREF(dropped);
            int empty = PyObject_Not(still);
            Py_DECREF(mask_obj);
            mask_obj = still;
            if (empty < 0) goto fail;
            if (empty) goto done;
        } else {
            Py_DECREF(still);
        }
    }
    if (append_run(runs, mask_obj, n) < 0) goto fail;

done:
    Py_XDECREF(mask_obj);
    Py_DECREF(seq);
    return runs;
fail:
    Py_XDECREF(mask_obj);
    Py_XDECREF(runs);
    Py_DECREF(seq);
    return NULL;
}

/* One holder more of each block: counts[h] += 1; a block's first holder ORs ``bit`` into
 * masks[h] (absent: 0). */
static PyObject *count_in(PyObject *self, PyObject *args) {
    PyObject *counts, *masks, *hashes, *bit;
    if (!PyArg_ParseTuple(args, "O!O!OO", &PyDict_Type, &counts, &PyDict_Type, &masks, &hashes,
                          &bit))
        return NULL;
    PyObject *seq = PySequence_Fast(hashes, "hashes must be a sequence");
    if (seq == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *zero = PyLong_FromLong(0), *one = PyLong_FromLong(1);
    if (zero == NULL || one == NULL) goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *h = items[i];
        PyObject *count = PyDict_GetItemWithError(counts, h);
        PyObject *value;
        if (count != NULL) {
            value = PyNumber_Add(count, one);
            if (value == NULL) goto fail;
            int rc = PyDict_SetItem(counts, h, value);
            Py_DECREF(value);
            if (rc < 0) goto fail;
            continue;
        }
        if (PyErr_Occurred() || PyDict_SetItem(counts, h, one) < 0) goto fail;
        PyObject *mask = PyDict_GetItemWithError(masks, h);
        if (mask == NULL && PyErr_Occurred()) goto fail;
        value = PyNumber_Or(mask == NULL ? zero : mask, bit);
        if (value == NULL) goto fail;
        int rc = PyDict_SetItem(masks, h, value);
        Py_DECREF(value);
        if (rc < 0) goto fail;
    }
    Py_DECREF(zero);
    Py_DECREF(one);
    Py_DECREF(seq);
    Py_RETURN_NONE;
fail:
    Py_XDECREF(zero);
    Py_XDECREF(one);
    Py_DECREF(seq);
    return NULL;
}

/* One holder less of each counted block: counts[h] -= 1; the last holder's leaving deletes
 * counts[h] and clears ``bit`` from masks[h]: the remaining mask is stored as shared[mask], else
 * share(mask); a mask left empty is deleted. Blocks not in ``counts`` are skipped. */
static PyObject *count_out(PyObject *self, PyObject *args) {
    PyObject *counts, *masks, *shared, *share, *hashes, *bit;
    if (!PyArg_ParseTuple(args, "O!O!O!OOO", &PyDict_Type, &counts, &PyDict_Type, &masks,
                          &PyDict_Type, &shared, &share, &hashes, &bit))
        return NULL;
    PyObject *seq = PySequence_Fast(hashes, "hashes must be a sequence");
    if (seq == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *one = PyLong_FromLong(1), *clear = PyNumber_Invert(bit);
    if (one == NULL || clear == NULL) goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *h = items[i];
        PyObject *count = PyDict_GetItemWithError(counts, h);
        if (count == NULL) {
            if (PyErr_Occurred()) goto fail;
            continue;
        }
        int more = PyObject_RichCompareBool(count, one, Py_GT);
        if (more < 0) goto fail;
        if (more) {
            PyObject *value = PyNumber_Subtract(count, one);
            if (value == NULL) goto fail;
            int rc = PyDict_SetItem(counts, h, value);
            Py_DECREF(value);
            if (rc < 0) goto fail;
            continue;
        }
        if (PyDict_DelItem(counts, h) < 0) goto fail;
        PyObject *mask = PyDict_GetItemWithError(masks, h);
        if (mask == NULL) {
            if (PyErr_Occurred()) goto fail;
            continue;
        }
        PyObject *left = PyNumber_And(mask, clear);
        if (left == NULL) goto fail;
        int any = PyObject_IsTrue(left);
        if (any <= 0) {
            Py_DECREF(left);
            if (any < 0 || PyDict_DelItem(masks, h) < 0) goto fail;
            continue;
        }
        PyObject *stored = PyDict_GetItemWithError(shared, left);
        if (stored != NULL) {
            Py_INCREF(stored);
        } else if (!PyErr_Occurred()) {
            stored = PyObject_CallOneArg(share, left);
        }
        Py_DECREF(left);
        if (stored == NULL) goto fail;
        int rc = PyDict_SetItem(masks, h, stored);
        Py_DECREF(stored);
        if (rc < 0) goto fail;
    }
    Py_DECREF(one);
    Py_DECREF(clear);
    Py_DECREF(seq);
    Py_RETURN_NONE;
fail:
    Py_XDECREF(one);
    Py_XDECREF(clear);
    Py_DECREF(seq);
    return NULL;
}

static PyMethodDef methods[] = {
    {"leading_runs", leading_runs, METH_VARARGS,
     "leading_runs(blocks, hashes) -> [(bits, depth)]: workers in bits hold the first depth "
     "blocks"},
    {"count_in", count_in, METH_VARARGS,
     "count_in(counts, masks, hashes, bit): one holder more of each block (see the module)"},
    {"count_out", count_out, METH_VARARGS,
     "count_out(counts, masks, shared, share, hashes, bit): one holder less of each block"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_leading", NULL, -1, methods,
};

PyMODINIT_FUNC PyInit__leading(void) { return PyModule_Create(&module); }
