/* Native hot path of LatencyModel.predict_endpoints: read every candidate's inputs (its cached
 * prefix, the load booked on it, its scraped metrics, its calibration) and predict its TTFT, in
 * one call and one loop, with no object made per candidate beyond the TTFT float.
 *
 * predict(endpoints, overlaps, active_overlaps, pending, prefilling, in_flight, active_blocks,
 *         context_blocks, fits, new_fit, isl, block_size, default_kv_blocks, output_tokens, cost)
 *     -> (addresses: list[str], ttft_ms: list[float], columns: bytes) | None
 *
 * ``columns`` holds 5 x n doubles, column after column: fixed_ms, token_ms, pending prefill
 * tokens, decoding requests, KV usage with the request (what calibration and the ITL need).
 * ``cost`` is (prefill_fixed, prefill_per_token, prefill_per_token_sq, decode_fixed,
 * decode_linear, decode_square, decode_floor, max_num_batched_tokens).
 *
 * Same arithmetic, in the same order, as the Python it replaces (held equal by tests). Python's
 * integers are unbounded; here every integer, read or computed, must stay below 2^53 in
 * magnitude: then int64 arithmetic cannot overflow and every conversion to double is exact, so
 * each result is the double Python computes. Anything outside that domain (a huge or non-int
 * count, a non-dict table, a non-float calibration) returns None and the caller runs the Python.
 * Build with -ffp-contract=off: a fused multiply-add would round differently from Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#define EXACT (1LL << 53)
#define COLUMNS 5

#ifndef Py_T_OBJECT_EX
#define Py_T_OBJECT_EX T_OBJECT_EX
#endif
#ifndef Py_AUDIT_READ
#define Py_AUDIT_READ PY_AUDIT_READ
#endif

enum { OUTSIDE = 0, OK = 1, FAILED = -1 };

/* Attribute reads. The objects read here (Endpoint, EndpointMetrics, WorkerFit) keep their fields
 * in __slots__; through PyObject_GetAttr each read costs a type lookup and a descriptor call, which
 * measured as most of this loop's instructions. So the slot's offset is looked up once per type
 * (and again whenever the type changes: its version tag moves) and read directly, exactly what the
 * slot's descriptor would do; any other kind of attribute goes through PyObject_GetAttr. */
typedef struct {
    const char *text;
    PyObject *name;
    PyTypeObject *type; /* identity only: a new type at the same address has another version */
    unsigned int version;
    Py_ssize_t offset; /* -1: not a plain slot */
} Attr;

static Attr a_address = {"address"}, a_metrics = {"metrics"},
            a_num_gpu_blocks = {"num_gpu_blocks"}, a_waiting = {"waiting"}, a_stale = {"stale"},
            a_booked_prefilling = {"booked_prefilling"}, a_theta_fixed = {"theta_fixed"},
            a_theta_token = {"theta_token"}, a_score = {"score"};
static Attr *attrs[] = {&a_address,       &a_metrics,           &a_num_gpu_blocks,
                        &a_waiting,       &a_stale,             &a_booked_prefilling,
                        &a_theta_fixed,   &a_theta_token,       &a_score};

static void resolve(PyTypeObject *type, Attr *attr) {
    PyObject *descr = _PyType_Lookup(type, attr->name); /* borrowed; tags the type's version */
    attr->offset = -1;
    attr->type = NULL;
    if (!(type->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG)) return;
    attr->type = type;
    attr->version = type->tp_version_tag;
    if (type->tp_getattro == PyObject_GenericGetAttr && descr != NULL &&
        Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
        PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
        if (member->type == Py_T_OBJECT_EX && !(member->flags & Py_AUDIT_READ))
            attr->offset = member->offset;
    }
}

/* getattr(obj, attr.name): a new reference, or NULL with an exception set. */
static PyObject *read_attr(PyObject *obj, Attr *attr) {
    PyTypeObject *type = Py_TYPE(obj);
    if (type != attr->type || !(type->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG) ||
        type->tp_version_tag != attr->version)
        resolve(type, attr);
    if (attr->offset >= 0) {
        PyObject *value = *(PyObject **)((char *)obj + attr->offset);
        if (value != NULL) return Py_NewRef(value);
    }
    return PyObject_GetAttr(obj, attr->name); /* unset slot: the AttributeError */
}

static int exact_int(PyObject *value, long long *out) {
    if (!PyLong_Check(value)) return OUTSIDE;
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (v == -1 && PyErr_Occurred()) return FAILED;
    if (overflow || v >= EXACT || v <= -EXACT) return OUTSIDE;
    *out = v;
    return OK;
}

/* dict.get(key, 0) */
static int table_int(PyObject *table, PyObject *key, long long *out) {
    PyObject *value = PyDict_GetItemWithError(table, key);
    if (value == NULL) {
        if (PyErr_Occurred()) return FAILED;
        *out = 0;
        return OK;
    }
    return exact_int(value, out);
}

static int attr_int(PyObject *obj, Attr *name, long long *out) {
    PyObject *value = read_attr(obj, name);
    if (value == NULL) return FAILED;
    int rc = exact_int(value, out);
    Py_DECREF(value);
    return rc;
}

static int attr_float(PyObject *obj, Attr *name, double *out) {
    PyObject *value = read_attr(obj, name);
    if (value == NULL) return FAILED;
    int rc = OUTSIDE;
    if (PyFloat_CheckExact(value)) {
        *out = PyFloat_AS_DOUBLE(value);
        rc = OK;
    }
    Py_DECREF(value);
    return rc;
}

static int in_range(long long v) { return v < EXACT && v > -EXACT; }

static int mul(long long a, long long b, long long *r) {
    return !__builtin_mul_overflow(a, b, r) && in_range(*r);
}

static int add(long long a, long long b, long long *r) {
    return !__builtin_add_overflow(a, b, r) && in_range(*r);
}

static int sub(long long a, long long b, long long *r) {
    return !__builtin_sub_overflow(a, b, r) && in_range(*r);
}

typedef struct {
    double a, b, c, d0, d1, d2, floor;
    long long budget;
    long long isl, block_size, default_blocks, request_tokens, output_tokens;
    PyObject *overlaps, *held, *pending, *prefilling, *in_flight, *active_blocks, *context_blocks;
    PyObject *fits, *new_fit;
} Inputs;

typedef struct {
    double ttft, fixed, token, pending, decoding, usage_after;
} Prediction;

/* Capacity in tokens: (metrics.num_gpu_blocks or default_kv_blocks) * block_size. */
static int capacity_of(PyObject *metrics, const Inputs *in, long long *capacity) {
    PyObject *value = read_attr(metrics, &a_num_gpu_blocks);
    if (value == NULL) return FAILED;
    long long blocks = in->default_blocks;
    int rc = OK;
    if (value != Py_None) {
        long long given = 0;
        rc = exact_int(value, &given);
        if (rc == OK && given != 0) blocks = given;
    }
    Py_DECREF(value);
    if (rc != OK) return rc;
    if (!mul(blocks, in->block_size, capacity) || *capacity == 0) return OUTSIDE;
    return OK;
}

/* The fit of ``address``: fits.get(address) or new_fit(address); *fixed, *token its thetas. */
static int thetas_of(PyObject *address, const Inputs *in, double *fixed, double *token) {
    PyObject *fit = PyDict_GetItemWithError(in->fits, address);
    if (fit != NULL) {
        Py_INCREF(fit);
    } else {
        if (PyErr_Occurred()) return FAILED;
        fit = PyObject_CallOneArg(in->new_fit, address);
        if (fit == NULL) return FAILED;
    }
    int rc = attr_float(fit, &a_theta_fixed, fixed);
    if (rc == OK) rc = attr_float(fit, &a_theta_token, token);
    Py_DECREF(fit);
    return rc;
}

static int predict_one(PyObject *endpoint, PyObject *address, const Inputs *in, Prediction *p) {
    long long cached, held, pending, prefilling, in_flight, active, context, capacity, uncached;
    long long decoding;
    int rc;
    if ((rc = table_int(in->overlaps, address, &cached)) != OK) return rc;
    if ((rc = table_int(in->held, address, &held)) != OK) return rc;
    if ((rc = table_int(in->pending, address, &pending)) != OK) return rc;
    if ((rc = table_int(in->prefilling, address, &prefilling)) != OK) return rc;
    if ((rc = table_int(in->in_flight, address, &in_flight)) != OK) return rc;
    if ((rc = table_int(in->active_blocks, address, &active)) != OK) return rc;
    if ((rc = table_int(in->context_blocks, address, &context)) != OK) return rc;
    long long cached_tokens;
    if (!mul(cached, in->block_size, &cached_tokens) || !sub(in->isl, cached_tokens, &uncached))
        return OUTSIDE;

    PyObject *metrics = read_attr(endpoint, &a_metrics);
    if (metrics == NULL) return FAILED;
    long long waiting = 0, booked = prefilling;
    rc = capacity_of(metrics, in, &capacity);
    if (rc == OK) rc = attr_int(metrics, &a_waiting, &waiting);
    if (rc == OK) {
        /* What this gateway had booked there when the metrics were read; None: the count now. */
        PyObject *value = read_attr(metrics, &a_booked_prefilling);
        if (value == NULL)
            rc = FAILED;
        else if (value != Py_None)
            rc = exact_int(value, &booked);
        Py_XDECREF(value);
    }
    if (rc == OK && waiting > booked) {
        /* Requests the engine held waiting beyond those booked here, each assumed this request's
         * size (unless the metrics are stale). */
        PyObject *stale = read_attr(metrics, &a_stale);
        int is_stale = stale == NULL ? -1 : PyObject_IsTrue(stale);
        Py_XDECREF(stale);
        if (is_stale < 0) {
            rc = FAILED;
        } else if (!is_stale) {
            long long extra;
            if (!mul(waiting - booked, in->isl, &extra) || !add(pending, extra, &pending))
                rc = OUTSIDE;
        }
    }
    Py_DECREF(metrics);
    if (rc != OK) return rc;

    long long active_tokens, context_tokens;
    if (!mul(active, in->block_size, &active_tokens) ||
        !mul(context, in->block_size, &context_tokens) || !sub(in_flight, prefilling, &decoding))
        return OUTSIDE;
    /* Decoding reads each request's context (a block two requests share, for each); the
     * KV-space wait below counts the distinct blocks the cache holds. */
    double usage = (double)context_tokens / (double)capacity;
    p->usage_after = usage + (double)in->request_tokens / (double)capacity;
    p->pending = (double)pending;
    p->decoding = (double)decoding;

    /* _kv_wait_steps: decode steps until the request's blocks fit in the cache. */
    long long held_tokens, lacking;
    if (!mul(held, in->block_size, &held_tokens) ||
        !add(active_tokens, in->request_tokens, &lacking) || !sub(lacking, held_tokens, &lacking) ||
        !sub(lacking, capacity, &lacking))
        return OUTSIDE;
    double wait = 0.0;
    if (lacking > 0 && active_tokens > 0 && in_flight > 0) {
        long long product, finishing, steps_num;
        if (!mul(lacking, in_flight, &product) || !add(product, active_tokens - 1, &product))
            return OUTSIDE;
        finishing = product / active_tokens; /* both positive: the ceiling of the exact ratio */
        if (finishing > in_flight) finishing = in_flight;
        if (!mul(finishing, in->output_tokens, &steps_num)) return OUTSIDE;
        wait = (double)steps_num / (double)(in_flight + 1);
    }

    /* LatencyModel.predict_many's loop body. */
    long long total, chunk, full, rest, steps, sq, chunk_sq, rest_sq;
    if (!add(pending > 0 ? pending : 0, uncached > 0 ? uncached : 1, &total)) return OUTSIDE;
    if (decoding < in->budget) {
        if (!sub(in->budget, decoding, &chunk)) return OUTSIDE;
    } else {
        chunk = 1;
    }
    full = total / chunk; /* both positive: C's division is Python's floor division */
    rest = total % chunk;
    steps = full + (rest ? 1 : 0);
    if (!mul(full, chunk, &sq) || !mul(sq, chunk, &chunk_sq) || !mul(rest, rest, &rest_sq) ||
        !add(chunk_sq, rest_sq, &sq))
        return OUTSIDE;
    double fixed;
    double u = usage < 0 ? 0.0 : usage > 1 ? 1.0 : usage;
    double decode_now = in->d0 + in->d1 * u + in->d2 * u * u;
    decode_now = decode_now > in->floor ? decode_now : in->floor;
    if (decoding > 0) {
        fixed = (double)steps * (in->a + decode_now) + 0.5 * decode_now;
    } else {
        fixed = (double)steps * in->a;
    }
    if (wait > 0) fixed += wait * decode_now;
    double token = in->b * (double)total + in->c * (double)sq;
    double theta_fixed, theta_token;
    if ((rc = thetas_of(address, in, &theta_fixed, &theta_token)) != OK) return rc;
    p->fixed = fixed;
    p->token = token;
    p->ttft = theta_fixed * fixed + theta_token * token;
    return OK;
}

static PyObject *predict(PyObject *self, PyObject *args) {
    PyObject *endpoints, *cost;
    Inputs in;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOLLLLO!", &endpoints, &in.overlaps, &in.held,
                          &in.pending, &in.prefilling, &in.in_flight, &in.active_blocks,
                          &in.context_blocks, &in.fits, &in.new_fit, &in.isl, &in.block_size,
                          &in.default_blocks, &in.output_tokens, &PyTuple_Type, &cost))
        return NULL;
    if (PyTuple_GET_SIZE(cost) != 8) {
        PyErr_SetString(PyExc_TypeError, "cost must be a tuple of 8 numbers");
        return NULL;
    }
    double *coefficients[] = {&in.a, &in.b, &in.c, &in.d0, &in.d1, &in.d2, &in.floor};
    for (int k = 0; k < 7; k++) {
        PyObject *item = PyTuple_GET_ITEM(cost, k);
        /* An int coefficient makes Python compute in ints: leave that to Python. */
        if (!PyFloat_CheckExact(item)) Py_RETURN_NONE;
        *coefficients[k] = PyFloat_AS_DOUBLE(item);
    }
    int rc = exact_int(PyTuple_GET_ITEM(cost, 7), &in.budget);
    if (rc == FAILED) return NULL;
    if (rc == OUTSIDE) Py_RETURN_NONE;
    if (!PyDict_CheckExact(in.overlaps) || !PyDict_CheckExact(in.held) ||
        !PyDict_CheckExact(in.pending) ||
        !PyDict_CheckExact(in.prefilling) || !PyDict_CheckExact(in.in_flight) ||
        !PyDict_CheckExact(in.active_blocks) || !PyDict_CheckExact(in.context_blocks) ||
        !PyDict_CheckExact(in.fits))
        Py_RETURN_NONE;
    long long blocks;
    if (!in_range(in.isl) || in.isl < 0 || in.block_size <= 0 || !in_range(in.block_size) ||
        !in_range(in.default_blocks) || !in_range(in.output_tokens) ||
        !add(in.isl, in.block_size - 1, &blocks) ||
        !mul(blocks / in.block_size, in.block_size, &in.request_tokens))
        Py_RETURN_NONE;

    /* A tuple of our own: new_fit runs Python code, which must not pull items from under us. */
    PyObject *seq = PySequence_Tuple(endpoints);
    if (seq == NULL) return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    PyObject *addresses = PyList_New(n);
    PyObject *ttft = PyList_New(n);
    PyObject *columns = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)sizeof(double) * COLUMNS * n);
    if (addresses == NULL || ttft == NULL || columns == NULL) goto fail;
    double *col = (double *)PyBytes_AS_STRING(columns);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *endpoint = PyTuple_GET_ITEM(seq, i);
        PyObject *address = read_attr(endpoint, &a_address);
        if (address == NULL) goto fail;
        PyList_SET_ITEM(addresses, i, address); /* the list owns it from here */
        if (!PyUnicode_CheckExact(address)) goto outside;
        Prediction p;
        int rc = predict_one(endpoint, address, &in, &p);
        if (rc == FAILED) goto fail;
        if (rc == OUTSIDE) goto outside;
        PyObject *value = PyFloat_FromDouble(p.ttft);
        if (value == NULL) goto fail;
        PyList_SET_ITEM(ttft, i, value);
        col[i] = p.fixed;
        col[n + i] = p.token;
        col[2 * n + i] = p.pending;
        col[3 * n + i] = p.decoding;
        col[4 * n + i] = p.usage_after;
    }
    Py_DECREF(seq);
    return Py_BuildValue("(NNN)", addresses, ttft, columns);
outside:
    Py_DECREF(seq);
    Py_DECREF(addresses);
    Py_DECREF(ttft);
    Py_DECREF(columns);
    Py_RETURN_NONE;
fail:
    Py_DECREF(seq);
    Py_XDECREF(addresses);
    Py_XDECREF(ttft);
    Py_XDECREF(columns);
    return NULL;
}

/* min_max_scores(addresses, costs) -> {address: (span - (cost - low)) / span} | None: scores from
 * costs, the cheapest 1 and the dearest 0 (all 1 when they are equal). None unless both are lists
 * of one length, of str and float. */
static PyObject *min_max_scores(PyObject *self, PyObject *args) {
    PyObject *addresses, *costs;
    if (!PyArg_ParseTuple(args, "OO", &addresses, &costs)) return NULL;
    if (!PyList_CheckExact(addresses) || !PyList_CheckExact(costs) ||
        PyList_GET_SIZE(addresses) != PyList_GET_SIZE(costs))
        Py_RETURN_NONE;
    Py_ssize_t n = PyList_GET_SIZE(costs);
    double low = 0, high = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *cost = PyList_GET_ITEM(costs, i);
        /* Exact str keys: no Python code runs below, so the lists cannot change under us. */
        if (!PyFloat_CheckExact(cost) || !PyUnicode_CheckExact(PyList_GET_ITEM(addresses, i)))
            Py_RETURN_NONE;
        double c = PyFloat_AS_DOUBLE(cost);
        /* As min() and max() do: the first item, replaced by any item below (above) it. */
        if (i == 0) {
            low = high = c;
        } else {
            if (c < low) low = c;
            if (c > high) high = c;
        }
    }
    double span = high - low;
    PyObject *scores = PyDict_New();
    if (scores == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        double c = PyFloat_AS_DOUBLE(PyList_GET_ITEM(costs, i));
        PyObject *score = PyFloat_FromDouble(span <= 0 ? 1.0 : (span - (c - low)) / span);
        if (score == NULL || PyDict_SetItem(scores, PyList_GET_ITEM(addresses, i), score) < 0) {
            Py_XDECREF(score);
            Py_DECREF(scores);
            return NULL;
        }
        Py_DECREF(score);
    }
    return scores;
}

/* Over a list of floats, none NaN (else OUTSIDE): the lowest, the band of the costs within
 * ``tolerance`` of it (cost <= low * (1 + tolerance)) and how many are in it. */
static int scan_costs(PyObject *costs, double tolerance, double *low, double *band,
                      Py_ssize_t *count) {
    if (!PyList_CheckExact(costs)) return OUTSIDE;
    Py_ssize_t n = PyList_GET_SIZE(costs);
    *low = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *cost = PyList_GET_ITEM(costs, i);
        if (!PyFloat_CheckExact(cost)) return OUTSIDE;
        double c = PyFloat_AS_DOUBLE(cost);
        if (c != c) return OUTSIDE;
        if (i == 0 || c < *low) *low = c;
    }
    *band = *low * (1.0 + tolerance);
    *count = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (PyFloat_AS_DOUBLE(PyList_GET_ITEM(costs, i)) <= *band) (*count)++;
    return OK;
}

/* near_ties(costs, tolerance) -> [index, ...] | None: where the costs within ``tolerance`` of the
 * lowest are (cost <= low * (1 + tolerance)), in list order. None unless ``costs`` is a list of
 * floats, none NaN. */
static PyObject *near_ties(PyObject *self, PyObject *args) {
    PyObject *costs;
    double tolerance, low, band;
    Py_ssize_t count;
    if (!PyArg_ParseTuple(args, "Od", &costs, &tolerance)) return NULL;
    if (scan_costs(costs, tolerance, &low, &band, &count) != OK) Py_RETURN_NONE;
    PyObject *found = PyList_New(count);
    if (found == NULL) return NULL;
    for (Py_ssize_t i = 0, k = 0; k < count; i++) {
        if (PyFloat_AS_DOUBLE(PyList_GET_ITEM(costs, i)) <= band) {
            PyObject *index = PyLong_FromSsize_t(i);
            if (index == NULL) {
                Py_DECREF(found);
                return NULL;
            }
            PyList_SET_ITEM(found, k++, index);
        }
    }
    return found;
}

/* A near tie's endpoint's cache size: metrics.num_gpu_blocks or ``default_blocks``. The read
 * may run Python code (a property): callers work on lists of their own. */
static int cache_blocks_of(PyObject *endpoint, long long default_blocks, long long *blocks) {
    PyObject *metrics = read_attr(endpoint, &a_metrics);
    if (metrics == NULL) return FAILED;
    PyObject *value = read_attr(metrics, &a_num_gpu_blocks);
    Py_DECREF(metrics);
    if (value == NULL) return FAILED;
    *blocks = default_blocks;
    int rc = OK;
    if (value != Py_None) {
        long long given = 0;
        rc = exact_int(value, &given);
        if (rc == OK && given != 0) *blocks = given;
    }
    Py_DECREF(value);
    return rc;
}

/* settle_near_ties(costs, tolerance, addresses, endpoints, overlaps, recent, scale, blocks,
 * default_capacity) -> list | None: predicted-latency-scorer's `settle_near_ties_python`, the
 * same numbers. ``costs`` itself when fewer than two are near ties; None when an input is not
 * what it can compare (then the Python runs). */
static PyObject *settle_near_ties(PyObject *self, PyObject *args) {
    PyObject *costs, *addresses, *endpoints, *overlaps, *recent;
    double tolerance, scale, low, band;
    long long blocks, default_capacity;
    Py_ssize_t count;
    if (!PyArg_ParseTuple(args, "OdOOOOdLL", &costs, &tolerance, &addresses, &endpoints,
                          &overlaps, &recent, &scale, &blocks, &default_capacity))
        return NULL;
    if (scan_costs(costs, tolerance, &low, &band, &count) != OK ||
        !PyList_CheckExact(addresses) || !PyList_CheckExact(endpoints) ||
        !PyDict_CheckExact(overlaps) || !PyDict_CheckExact(recent))
        Py_RETURN_NONE;
    Py_ssize_t n = PyList_GET_SIZE(costs);
    if (PyList_GET_SIZE(addresses) != n || PyList_GET_SIZE(endpoints) != n || n == 0)
        Py_RETURN_NONE;
    if (count < 2 || band <= low) return Py_NewRef(costs);
    /* Private copies: the getattr below may run Python code, which must not move what we read. */
    PyObject *settled = PyList_GetSlice(costs, 0, n);
    PyObject *names = PyList_GetSlice(addresses, 0, n);
    PyObject *eps = PyList_GetSlice(endpoints, 0, n);
    Py_ssize_t *near = PyMem_Malloc(sizeof(Py_ssize_t) * count);
    double *harm = PyMem_Malloc(sizeof(double) * count);
    PyObject *result = NULL;
    if (settled == NULL || names == NULL || eps == NULL || near == NULL || harm == NULL) {
        if (near == NULL || harm == NULL) PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0, k = 0; i < n; i++)
        if (PyFloat_AS_DOUBLE(PyList_GET_ITEM(settled, i)) <= band) near[k++] = i;
    double most = 0;
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *name = PyList_GET_ITEM(names, near[k]);
        long long cached = 0, capacity = 0;
        int rc = table_int(overlaps, name, &cached);
        if (rc == FAILED) goto done;
        if (rc == OUTSIDE) goto decline;
        double churned = 0.0;
        PyObject *count_there = PyDict_GetItemWithError(recent, name);
        if (count_there == NULL && PyErr_Occurred()) goto done;
        if (count_there != NULL) {
            if (!PyFloat_CheckExact(count_there)) goto decline;
            churned = PyFloat_AS_DOUBLE(count_there);
        }
        rc = cache_blocks_of(PyList_GET_ITEM(eps, near[k]), default_capacity, &capacity);
        if (rc == FAILED) goto done;
        if (rc == OUTSIDE || capacity <= 0) goto decline;
        long long added_blocks = blocks - cached;
        double added = (double)(added_blocks < 1 ? 1 : added_blocks);
        harm[k] = added * (churned * scale + added) / (double)capacity;
        if (k == 0 || harm[k] > most) most = harm[k];
    }
    if (!(most > 0)) goto decline;
    double half = (band - low) * 0.5;
    double width = half * 0.999 / most;
    for (Py_ssize_t k = 0; k < count; k++) {
        double c = PyFloat_AS_DOUBLE(PyList_GET_ITEM(settled, near[k]));
        PyObject *value = PyFloat_FromDouble(low + (c - low) * 0.5 + width * harm[k]);
        if (value == NULL) goto done;
        PyList_SetItem(settled, near[k], value); /* steals value, drops the old cost */
    }
    result = Py_NewRef(settled);
    goto done;
decline:
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(settled);
    Py_XDECREF(names);
    Py_XDECREF(eps);
    PyMem_Free(near);
    PyMem_Free(harm);
    return result;
}

/* top_scored(scored) -> [index, ...] | None: where the highest ``score`` is in a list of scored
 * endpoints, in list order. None unless it is a non-empty list whose scores are all floats and
 * none is NaN. */
static PyObject *top_scored(PyObject *self, PyObject *scored) {
    if (!PyList_CheckExact(scored) || PyList_GET_SIZE(scored) == 0) Py_RETURN_NONE;
    Py_ssize_t n = PyList_GET_SIZE(scored);
    double top = 0;
    Py_ssize_t ties = 0;
    /* Reading a score runs no Python code (a slot, else getattr: then give up), so the list
     * cannot change under us. */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(scored, i);
        PyTypeObject *type = Py_TYPE(item);
        if (type != a_score.type || !(type->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG) ||
            type->tp_version_tag != a_score.version)
            resolve(type, &a_score);
        if (a_score.offset < 0) Py_RETURN_NONE;
        PyObject *value = *(PyObject **)((char *)item + a_score.offset);
        if (value == NULL || !PyFloat_CheckExact(value)) Py_RETURN_NONE;
        double score = PyFloat_AS_DOUBLE(value);
        if (score != score) Py_RETURN_NONE;
        if (i == 0 || score > top) {
            top = score;
            ties = 1;
        } else if (score == top) {
            ties++;
        }
    }
    PyObject *found = PyList_New(ties);
    if (found == NULL) return NULL;
    for (Py_ssize_t i = 0, k = 0; k < ties; i++) {
        PyObject *value = *(PyObject **)((char *)PyList_GET_ITEM(scored, i) + a_score.offset);
        if (PyFloat_AS_DOUBLE(value) == top) {
            PyObject *index = PyLong_FromSsize_t(i);
            if (index == NULL) {
                Py_DECREF(found);
                return NULL;
            }
            PyList_SET_ITEM(found, k++, index);
        }
    }
    return found;
}

static PyMethodDef methods[] = {
    {"predict", predict, METH_VARARGS,
     "predict(endpoints, overlaps, active_overlaps, pending, prefilling, in_flight, active_blocks, "
     "context_blocks, fits, new_fit, isl, block_size, default_kv_blocks, output_tokens, cost) "
     "-> (addresses, ttft_ms, columns) | None"},
    {"min_max_scores", min_max_scores, METH_VARARGS,
     "min_max_scores(addresses, costs) -> {address: score} | None: the cheapest 1, the dearest 0"},
    {"near_ties", near_ties, METH_VARARGS,
     "near_ties(costs, tolerance) -> [index] | None: where costs <= lowest * (1 + tolerance)"},
    {"settle_near_ties", settle_near_ties, METH_VARARGS,
     "settle_near_ties(costs, tolerance, addresses, endpoints, overlaps, recent, scale, blocks, "
     "default_capacity) -> list | None: the near ties' costs ordered half by cost, half by harm"},
    {"top_scored", top_scored, METH_O,
     "top_scored(scored) -> [index] | None: where the highest score is, in list order"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_latency", NULL, -1, methods,
};

PyMODINIT_FUNC PyInit__latency(void) {
    for (size_t i = 0; i < sizeof(attrs) / sizeof(attrs[0]); i++) {
        if (attrs[i]->name == NULL) {
            attrs[i]->name = PyUnicode_InternFromString(attrs[i]->text);
            if (attrs[i]->name == NULL) return NULL;
        }
    }
    return PyModule_Create(&module);
}
