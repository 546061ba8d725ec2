/* Native inner loop of MaskIndex.find_matches: walk a request's block hashes through the
 * index's hash -> worker-bitmask dict, AND-ing the masks, and report where workers drop out.
 *
 * leading_runs(blocks: dict[int, int], hashes: Sequence[int]) -> list[tuple[int, int]]
 *     [(bits, depth), ...]: the workers in ``bits`` hold exactly the first ``depth`` blocks.
 *
 * Same result as the Python loop it replaces (held equal by tests). Masks that fit in 64 bits
 * (up to 64 worker slots) are AND-ed as machine words; wider ones as Python ints.
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

static PyMethodDef methods[] = {
    {"leading_runs", leading_runs, METH_VARARGS,
     "leading_runs(blocks, hashes) -> [(bits, depth)]: workers in bits hold the first depth "
     "blocks"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_leading", NULL, -1, methods,
};

PyMODINIT_FUNC PyInit__leading(void) { return PyModule_Create(&module); }
