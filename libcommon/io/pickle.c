/* Restricted pickle interpreter: see pickle.h.
 *
 * The machine is Python's (pickletools documents it): a stack of objects, a
 * stack of marks (positions in the stack where a MARK opcode was seen), and a
 * memo (an array of objects the pickle can refer back to).  Objects here are
 * inert descriptions: a "global" is just a tag naming one of the few callables
 * we know, and REDUCE on it builds a tensor or dict description by hand. */
#include "pickle.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "../core/arena.h"

/* Limits against hostile input.  An honest torch state dict needs a stack of
 * a few thousand entries (SETITEMS batches of 1000 pairs), marks nested about
 * five deep, and one memo entry per object. */
#define MAX_STACK   (1 << 20)
#define MAX_MARKS   64        /* nesting of MARK ... TUPLE/SETITEMS */
#define MAX_MEMO    (1 << 24) /* and at most one per input byte, see memo_put */
#define MAX_OBJECTS (1 << 22) /* SD1.5 with EMA and optimizer state: ~100k */
#define MAX_GLOBAL  256       /* bytes in a GLOBAL module or name */
#define MAX_KEY     256       /* bytes in a storage key (torch writes "0", "1", ...) */

enum okind { O_NONE, O_BOOL, O_INT, O_FLOAT, O_STR, O_BYTES, O_TUPLE, O_LIST, O_DICT, O_GLOBAL, O_STORAGE, O_TENSOR };

/* The callables we accept; a global is one of these or refused. */
enum gkind { G_REBUILD_TENSOR_V2, G_REBUILD_PARAMETER, G_REBUILD_PARAMETER_WITH_STATE, G_ORDERED_DICT, G_STORAGE };

typedef struct obj obj;

typedef struct tensor_desc {
    const obj *storage; /* O_STORAGE */
    int64_t offset;
    int ndim;
    int64_t shape[DB_MAXDIM], strides[DB_MAXDIM];
} tensor_desc;

struct obj {
    int kind;
    union {
        int64_t i;                                     /* O_BOOL, O_INT */
        double f;                                      /* O_FLOAT */
        struct { const char *p; size_t n; } s;         /* O_STR, O_BYTES; NUL-terminated copy */
        struct { obj **v; size_t n, cap; int ordered; } seq; /* O_TUPLE, O_LIST; O_DICT as k0 v0 k1 v1 */
        struct { int which; db_dtype dtype; } g;       /* O_GLOBAL; dtype for G_STORAGE */
        struct { const char *key, *location; db_dtype dtype; int64_t numel; } st; /* O_STORAGE */
        const tensor_desc *t;                          /* O_TENSOR */
    } u;
};

typedef struct unpickler {
    const unsigned char *buf;
    size_t n, pos, op_pos; /* op_pos: where the current opcode began */
    db_arena arena;
    unsigned char *chunk; /* small allocations are carved from arena chunks */
    size_t chunk_left;
    size_t nobj;
    obj **stack;
    size_t sp, stack_cap;
    size_t marks[MAX_MARKS];
    int nmarks;
    obj **memo;
    size_t memo_cap, memo_len; /* memo_len: entries set, for MEMOIZE */
    obj none, yes, no, empty_tuple; /* shared immutable values */
    db_err *err;
} unpickler;

/* ---- errors and memory ------------------------------------------------- */

/* Set err with the position of the current opcode appended; returns -1. */
static int fail(unpickler *u, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(unpickler *u, int code, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return db_err_set(u->err, code, "%s (pickle byte %zu)", msg, u->op_pos);
}

/* Copy a string from hostile input into a message: printable ASCII only, so a
 * crafted name cannot put escape sequences on the user's terminal. */
static const char *printable(char *dst, size_t cap, const char *s, size_t n)
{
    size_t o = 0;
    for (size_t i = 0; i < n && o + 4 < cap; i++)
        dst[o++] = (s[i] >= 0x20 && s[i] < 0x7f) ? s[i] : '?';
    if (n > 0 && o + 4 >= cap && o < n) {
        memcpy(dst + o, "...", 3);
        o += 3;
    }
    dst[o] = 0;
    return dst;
}

/* 8-byte aligned bump allocation from 64 KiB arena chunks: the arena itself
 * rounds every allocation to 64 bytes, too much for millions of small objects. */
static void *ualloc(unpickler *u, size_t n)
{
    n = (n + 7) & ~(size_t)7;
    if (n > 4096)
        return db_arena_alloc(&u->arena, n);
    if (n > u->chunk_left) {
        u->chunk = db_arena_alloc(&u->arena, 1 << 16);
        if (!u->chunk) {
            u->chunk_left = 0;
            return NULL;
        }
        u->chunk_left = 1 << 16;
    }
    void *p = u->chunk;
    u->chunk += n;
    u->chunk_left -= n;
    return p;
}

static obj *new_obj(unpickler *u, int kind)
{
    if (u->nobj >= MAX_OBJECTS) {
        fail(u, DB_EFORMAT, "more than %d objects", MAX_OBJECTS);
        return NULL;
    }
    obj *o = ualloc(u, sizeof *o);
    if (!o) {
        db_err_set(u->err, DB_ENOMEM, "pickle: out of memory");
        return NULL;
    }
    memset(o, 0, sizeof *o);
    o->kind = kind;
    u->nobj++;
    return o;
}

/* Grow an array of pointers to hold at least `need` (old copies stay in the
 * arena until the end: doubling bounds the waste to the final size). */
static int grow(unpickler *u, obj ***v, size_t *cap, size_t need)
{
    if (need <= *cap)
        return 0;
    size_t c = *cap ? *cap : 8;
    while (c < need)
        c *= 2;
    obj **nv = ualloc(u, c * sizeof *nv);
    if (!nv)
        return db_err_set(u->err, DB_ENOMEM, "pickle: out of memory");
    if (*cap)
        memcpy(nv, *v, *cap * sizeof *nv);
    memset(nv + *cap, 0, (c - *cap) * sizeof *nv);
    *v = nv;
    *cap = c;
    return 0;
}

/* ---- reading the input ------------------------------------------------- */

static int need(unpickler *u, size_t k, const char *what)
{
    if (u->n - u->pos < k)
        return fail(u, DB_EFORMAT, "truncated pickle: %s needs %zu bytes, %zu left", what, k, u->n - u->pos);
    return 0;
}

static uint64_t rd_le(const unsigned char *p, int k)
{
    uint64_t v = 0;
    for (int i = k - 1; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/* Read k-byte little-endian unsigned argument. */
static int arg_u(unpickler *u, int k, const char *what, uint64_t *v)
{
    if (need(u, (size_t)k, what))
        return -1;
    *v = rd_le(u->buf + u->pos, k);
    u->pos += (size_t)k;
    return 0;
}

/* A newline-terminated argument of the text opcodes (GLOBAL, PUT, GET, INT);
 * returns its length without the newline, -1 on error. */
static int arg_line(unpickler *u, const char *what, size_t max, const char **s, size_t *len)
{
    size_t left = u->n - u->pos;
    const unsigned char *nl = memchr(u->buf + u->pos, '\n', left < max + 1 ? left : max + 1);
    if (!nl && left > max)
        return fail(u, DB_EFORMAT, "%s argument longer than %zu bytes", what, max);
    if (!nl)
        return fail(u, DB_EFORMAT, "truncated pickle: %s has no end of line", what);
    *s = (const char *)u->buf + u->pos;
    *len = (size_t)(nl - (u->buf + u->pos));
    u->pos += *len + 1;
    return 0;
}

/* Decimal text argument (PUT, GET, INT): optional sign then digits. */
static int parse_decimal(unpickler *u, const char *s, size_t len, const char *what, int64_t *v)
{
    size_t i = 0;
    int neg = 0;
    if (i < len && (s[i] == '-' || s[i] == '+'))
        neg = s[i++] == '-';
    if (i == len)
        return fail(u, DB_EFORMAT, "%s: empty number", what);
    uint64_t x = 0;
    for (; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return fail(u, DB_EFORMAT, "%s: bad digit in number", what);
        if (x > (UINT64_MAX - 9) / 10 || x * 10 + (uint64_t)(s[i] - '0') > (uint64_t)INT64_MAX)
            return fail(u, DB_EUNSUPP, "%s: number out of 64-bit range", what);
        x = x * 10 + (uint64_t)(s[i] - '0');
    }
    *v = neg ? -(int64_t)x : (int64_t)x;
    return 0;
}

/* ---- the stack, marks and memo ---------------------------------------- */

static int push(unpickler *u, obj *o)
{
    if (!o)
        return -1;
    if (u->sp >= MAX_STACK)
        return fail(u, DB_EFORMAT, "stack deeper than %d", MAX_STACK);
    if (u->sp == u->stack_cap && grow(u, &u->stack, &u->stack_cap, u->sp + 1))
        return -1;
    u->stack[u->sp++] = o;
    return 0;
}

/* Items below the innermost mark belong to an outer level: plain pops stop
 * there, as Python's own unpickler does ("unpickling stack underflow"). */
static size_t stack_floor(const unpickler *u) { return u->nmarks ? u->marks[u->nmarks - 1] : 0; }

static obj *pop(unpickler *u, const char *what)
{
    if (u->sp <= stack_floor(u)) {
        fail(u, DB_EFORMAT, "%s on an empty stack", what);
        return NULL;
    }
    return u->stack[--u->sp];
}

static obj *top(unpickler *u, const char *what)
{
    if (u->sp <= stack_floor(u)) {
        fail(u, DB_EFORMAT, "%s on an empty stack", what);
        return NULL;
    }
    return u->stack[u->sp - 1];
}

/* Pop the innermost mark; *start receives the stack index it marked. */
static int pop_mark(unpickler *u, const char *what, size_t *start)
{
    if (!u->nmarks)
        return fail(u, DB_EFORMAT, "%s without a MARK", what);
    *start = u->marks[--u->nmarks];
    return 0;
}

static int memo_put(unpickler *u, uint64_t idx)
{
    /* Picklers number memo entries 0, 1, 2... and each PUT costs at least one
     * input byte, so an index beyond the input length is a lie that would
     * only make us allocate. */
    if (idx >= MAX_MEMO || idx > u->n)
        return fail(u, DB_EFORMAT, "memo index %llu out of range", (unsigned long long)idx);
    obj *o = top(u, "PUT");
    if (!o)
        return -1;
    if (grow(u, &u->memo, &u->memo_cap, (size_t)idx + 1))
        return -1;
    u->memo_len += !u->memo[idx];
    u->memo[idx] = o;
    return 0;
}

static int memo_get(unpickler *u, uint64_t idx)
{
    if (idx >= u->memo_cap || !u->memo[idx])
        return fail(u, DB_EFORMAT, "memo index %llu was never stored", (unsigned long long)idx);
    return push(u, u->memo[idx]);
}

/* ---- objects ------------------------------------------------------------ */

static obj *new_int(unpickler *u, int64_t v)
{
    obj *o = new_obj(u, O_INT);
    if (o)
        o->u.i = v;
    return o;
}

/* A string or bytes object of len bytes read from the input. */
static int push_str(unpickler *u, int kind, uint64_t len, const char *what)
{
    if (len > u->n - u->pos) /* checked before allocating anything */
        return fail(u, DB_EFORMAT, "truncated pickle: %s claims %llu bytes, %zu left", what,
                    (unsigned long long)len, u->n - u->pos);
    obj *o = new_obj(u, kind);
    if (!o)
        return -1;
    char *p = ualloc(u, (size_t)len + 1);
    if (!p)
        return db_err_set(u->err, DB_ENOMEM, "pickle: out of memory");
    memcpy(p, u->buf + u->pos, (size_t)len);
    p[len] = 0;
    u->pos += (size_t)len;
    o->u.s.p = p;
    o->u.s.n = (size_t)len;
    return push(u, o);
}

static int is_str(const obj *o, const char *s)
{
    return o->kind == O_STR && o->u.s.n == strlen(s) && !memcmp(o->u.s.p, s, o->u.s.n);
}

/* A tuple of the stack items [start, sp), which are popped. */
static int make_tuple(unpickler *u, size_t start)
{
    size_t k = u->sp - start;
    if (k == 0)
        return push(u, &u->empty_tuple);
    obj *o = new_obj(u, O_TUPLE);
    if (!o)
        return -1;
    o->u.seq.v = ualloc(u, k * sizeof *o->u.seq.v);
    if (!o->u.seq.v)
        return db_err_set(u->err, DB_ENOMEM, "pickle: out of memory");
    memcpy(o->u.seq.v, u->stack + start, k * sizeof *o->u.seq.v);
    o->u.seq.n = o->u.seq.cap = k;
    u->sp = start;
    return push(u, o);
}

/* Append the stack items [start, sp) to the list or dict just below start. */
static int add_items(unpickler *u, size_t start, int kind, const char *what)
{
    if (start == 0 || start <= stack_floor(u))
        return fail(u, DB_EFORMAT, "%s with no container below its items", what);
    obj *c = u->stack[start - 1];
    size_t k = u->sp - start;
    if (c->kind != kind)
        return fail(u, DB_EFORMAT, "%s on a %s", what,
                    c->kind == O_LIST ? "list" : c->kind == O_DICT ? "dict" : "non-container");
    if (kind == O_DICT && (k & 1))
        return fail(u, DB_EFORMAT, "%s with an odd number of items", what);
    if (k == 0)
        return 0; /* an empty APPENDS / SETITEMS batch */
    if (grow(u, &c->u.seq.v, &c->u.seq.cap, c->u.seq.n + k))
        return -1;
    memcpy(c->u.seq.v + c->u.seq.n, u->stack + start, k * sizeof *c->u.seq.v);
    c->u.seq.n += k;
    u->sp = start;
    return 0;
}

/* ---- globals: the allow list ------------------------------------------ */

static const struct {
    const char *module, *name;
    int which;
    db_dtype dtype;
} allowed[] = {
    {"torch._utils", "_rebuild_tensor_v2", G_REBUILD_TENSOR_V2, DB_F32},
    {"torch._utils", "_rebuild_parameter", G_REBUILD_PARAMETER, DB_F32},
    {"torch._utils", "_rebuild_parameter_with_state", G_REBUILD_PARAMETER_WITH_STATE, DB_F32},
    {"collections", "OrderedDict", G_ORDERED_DICT, DB_F32},
    {"torch", "FloatStorage", G_STORAGE, DB_F32},
    {"torch", "HalfStorage", G_STORAGE, DB_F16},
    {"torch", "BFloat16Storage", G_STORAGE, DB_BF16},
    {"torch", "DoubleStorage", G_STORAGE, DB_F64},
    {"torch", "LongStorage", G_STORAGE, DB_I64},
    {"torch", "IntStorage", G_STORAGE, DB_I32},
    {"torch", "ShortStorage", G_STORAGE, DB_I16},
    {"torch", "CharStorage", G_STORAGE, DB_I8},
    {"torch", "ByteStorage", G_STORAGE, DB_U8},
    {"torch", "BoolStorage", G_STORAGE, DB_BOOL},
};

static int eq(const char *s, size_t n, const char *lit) { return strlen(lit) == n && !memcmp(s, lit, n); }

/* Look up module.name in the allow list: the index, or -1 with a
 * DB_ESECURITY error naming it. */
static int find_global(unpickler *u, const char *mod, size_t nmod, const char *name, size_t nname)
{
    for (size_t i = 0; i < sizeof allowed / sizeof allowed[0]; i++)
        if (eq(mod, nmod, allowed[i].module) && eq(name, nname, allowed[i].name))
            return (int)i;
    char m[160], nm[160];
    return fail(u, DB_ESECURITY, "pickle refers to global '%s.%s' which is not allowed (only tensors and state dicts are)",
                printable(m, sizeof m, mod, nmod), printable(nm, sizeof nm, name, nname));
}

static int push_global(unpickler *u, const char *mod, size_t nmod, const char *name, size_t nname)
{
    int i = find_global(u, mod, nmod, name, nname);
    if (i < 0)
        return -1;
    obj *o = new_obj(u, O_GLOBAL);
    if (!o)
        return -1;
    o->u.g.which = allowed[i].which;
    o->u.g.dtype = allowed[i].dtype;
    return push(u, o);
}

static const char *global_name(const obj *g)
{
    for (size_t i = 0; i < sizeof allowed / sizeof allowed[0]; i++)
        if (allowed[i].which == g->u.g.which && allowed[i].dtype == g->u.g.dtype)
            return allowed[i].name;
    return "?";
}

/* ---- REDUCE, BUILD, BINPERSID: the only places Python would run code ---- */

static int as_int(const obj *o, int64_t *v)
{
    if (o->kind != O_INT && o->kind != O_BOOL)
        return -1;
    *v = o->u.i;
    return 0;
}

/* _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
 * backward_hooks[, metadata]) -> a strided view of the storage. */
static int rebuild_tensor(unpickler *u, const obj *args)
{
    size_t n = args->u.seq.n;
    obj *const *a = args->u.seq.v;
    int64_t rg;
    if (n != 6 && n != 7)
        return fail(u, DB_EFORMAT, "_rebuild_tensor_v2 takes 6 or 7 arguments, got %zu", n);
    if (a[0]->kind != O_STORAGE)
        return fail(u, DB_EFORMAT, "_rebuild_tensor_v2: first argument is not a storage");
    if (a[2]->kind != O_TUPLE || a[3]->kind != O_TUPLE)
        return fail(u, DB_EFORMAT, "_rebuild_tensor_v2: size and stride must be tuples");
    if (as_int(a[4], &rg) || a[5]->kind != O_DICT)
        return fail(u, DB_EFORMAT, "_rebuild_tensor_v2: bad requires_grad or backward_hooks");
    /* backward hooks are never saved with content by torch; metadata (a[6]) is ignored */
    tensor_desc *t = ualloc(u, sizeof *t);
    if (!t)
        return db_err_set(u->err, DB_ENOMEM, "pickle: out of memory");
    memset(t, 0, sizeof *t);
    t->storage = a[0];
    if (as_int(a[1], &t->offset) || t->offset < 0)
        return fail(u, DB_EFORMAT, "_rebuild_tensor_v2: bad storage offset");
    size_t nd = a[2]->u.seq.n;
    if (nd != a[3]->u.seq.n)
        return fail(u, DB_EFORMAT, "_rebuild_tensor_v2: size has %zu dims, stride %zu", nd, a[3]->u.seq.n);
    if (nd > DB_MAXDIM)
        return fail(u, DB_EUNSUPP, "_rebuild_tensor_v2: %zu dims (at most %d supported)", nd, DB_MAXDIM);
    t->ndim = (int)nd;
    /* The view must stay inside the storage: its last element is at
     * offset + sum((size - 1) * stride).  Every term is checked for overflow. */
    int64_t last = t->offset, numel = 1;
    for (size_t i = 0; i < nd; i++) {
        if (as_int(a[2]->u.seq.v[i], &t->shape[i]) || t->shape[i] < 0 ||
            as_int(a[3]->u.seq.v[i], &t->strides[i]) || t->strides[i] < 0)
            return fail(u, DB_EFORMAT, "_rebuild_tensor_v2: bad size or stride in dim %zu", i);
        if (t->shape[i] == 0)
            numel = 0;
    }
    /* a stride-0 (expanded) view can have more elements than its storage:
     * its byte size must still be representable */
    if (db_shape_nbytes(a[0]->u.st.dtype, t->ndim, t->shape) < 0)
        return fail(u, DB_EFORMAT, "_rebuild_tensor_v2: element count overflows");
    if (numel) {
        for (size_t i = 0; i < nd; i++) {
            int64_t d = t->shape[i] - 1, s = t->strides[i];
            if (s && d > (INT64_MAX - last) / s)
                return fail(u, DB_EFORMAT, "_rebuild_tensor_v2: view extent overflows");
            last += d * s;
        }
        if (last >= a[0]->u.st.numel)
            return fail(u, DB_EFORMAT, "tensor view reaches element %lld of a storage of %lld elements",
                        (long long)last, (long long)a[0]->u.st.numel);
    }
    obj *o = new_obj(u, O_TENSOR);
    if (!o)
        return -1;
    o->u.t = t;
    return push(u, o);
}

static int reduce(unpickler *u)
{
    obj *args = pop(u, "REDUCE");
    obj *fn = args ? pop(u, "REDUCE") : NULL;
    if (!fn)
        return -1;
    if (fn->kind != O_GLOBAL)
        return fail(u, DB_ESECURITY, "REDUCE on something that is not an allowed global");
    if (args->kind != O_TUPLE)
        return fail(u, DB_EFORMAT, "REDUCE arguments are not a tuple");
    size_t n = args->u.seq.n;
    obj *const *a = args->u.seq.v;
    int64_t rg;
    switch (fn->u.g.which) {
    case G_ORDERED_DICT: {
        if (n != 0)
            return fail(u, DB_EUNSUPP, "OrderedDict() with arguments");
        obj *d = new_obj(u, O_DICT);
        if (!d)
            return -1;
        d->u.seq.ordered = 1;
        return push(u, d);
    }
    case G_REBUILD_TENSOR_V2:
        return rebuild_tensor(u, args);
    case G_REBUILD_PARAMETER:
    case G_REBUILD_PARAMETER_WITH_STATE:
        /* (data, requires_grad, backward_hooks[, state]): a Parameter is its data */
        if (n != (fn->u.g.which == G_REBUILD_PARAMETER ? 3u : 4u) || a[0]->kind != O_TENSOR || as_int(a[1], &rg) ||
            a[2]->kind != O_DICT)
            return fail(u, DB_EFORMAT, "%s: bad arguments", global_name(fn));
        return push(u, a[0]);
    default:
        return fail(u, DB_ESECURITY, "pickle calls torch.%s, which is not allowed", global_name(fn));
    }
}

/* BUILD sets an object's state (obj.__setstate__ or __dict__ update).  torch
 * puts `_metadata` (per-module versions) on state-dict OrderedDicts; that is
 * the only BUILD we accept, and we ignore the state. */
static int build(unpickler *u)
{
    obj *state = pop(u, "BUILD");
    obj *o = state ? top(u, "BUILD") : NULL;
    if (!o)
        return -1;
    if (o->kind != O_DICT || !o->u.seq.ordered)
        return fail(u, DB_ESECURITY, "BUILD (set object state) on something other than an OrderedDict");
    return 0;
}

/* Storage keys name zip members and appear in messages: printable ASCII,
 * no '/', not empty, not long. */
static int key_ok(const char *s, size_t n)
{
    if (n == 0 || n > MAX_KEY)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (s[i] <= 0x20 || s[i] >= 0x7f || s[i] == '/')
            return 0;
    return 1;
}

/* BINPERSID: torch's persistent id ('storage', StorageClass, key, location,
 * numel) stands for the bytes in data/<key>. */
static int persistent_load(unpickler *u)
{
    obj *pid = pop(u, "BINPERSID");
    if (!pid)
        return -1;
    if (pid->kind != O_TUPLE || pid->u.seq.n != 5 || !is_str(pid->u.seq.v[0], "storage"))
        return fail(u, DB_EFORMAT, "persistent id is not ('storage', class, key, location, numel)");
    obj *const *a = pid->u.seq.v;
    if (a[1]->kind != O_GLOBAL || a[1]->u.g.which != G_STORAGE)
        return fail(u, DB_EFORMAT, "persistent id: storage class is not a torch storage type");
    if (a[2]->kind != O_STR || !key_ok(a[2]->u.s.p, a[2]->u.s.n))
        return fail(u, DB_EFORMAT, "persistent id: bad storage key");
    if (a[3]->kind != O_STR)
        return fail(u, DB_EFORMAT, "persistent id: location is not a string");
    int64_t numel;
    int64_t esz = (int64_t)db_dtype_size(a[1]->u.g.dtype);
    if (as_int(a[4], &numel) || numel < 0 || numel > INT64_MAX / esz)
        return fail(u, DB_EFORMAT, "persistent id: bad storage size");
    obj *o = new_obj(u, O_STORAGE);
    if (!o)
        return -1;
    o->u.st.key = a[2]->u.s.p;
    o->u.st.location = a[3]->u.s.p;
    o->u.st.dtype = a[1]->u.g.dtype;
    o->u.st.numel = numel;
    return push(u, o);
}

/* ---- the interpreter loop --------------------------------------------- */

static int run(unpickler *u, obj **result)
{
    for (;;) {
        u->op_pos = u->pos;
        if (u->pos >= u->n)
            return fail(u, DB_EFORMAT, "truncated pickle: no STOP opcode");
        unsigned char op = u->buf[u->pos++];
        uint64_t v;
        int64_t iv;
        const char *s, *s2;
        size_t len, len2, start = 0;
        obj *o, *o2;
        switch (op) {
        case 0x80: /* PROTO */
            if (arg_u(u, 1, "PROTO", &v))
                return -1;
            if (v < 2 || v > 5)
                return fail(u, DB_EUNSUPP, "pickle protocol %llu (2 to 5 supported)", (unsigned long long)v);
            break;
        case 0x95: /* FRAME: a length prefix for buffering; the data follows inline */
            if (arg_u(u, 8, "FRAME", &v))
                return -1;
            if (v > u->n - u->pos)
                return fail(u, DB_EFORMAT, "truncated pickle: FRAME claims %llu bytes, %zu left",
                            (unsigned long long)v, u->n - u->pos);
            break;
        case '.': /* STOP */
            if (u->nmarks)
                return fail(u, DB_EFORMAT, "STOP inside an unclosed MARK");
            if (!(*result = pop(u, "STOP")))
                return -1;
            return 0;

        /* constants */
        case 'N': if (push(u, &u->none)) return -1; break;
        case 0x88: if (push(u, &u->yes)) return -1; break;
        case 0x89: if (push(u, &u->no)) return -1; break;
        case 'J': /* BININT: signed 32-bit */
            if (arg_u(u, 4, "BININT", &v) || push(u, new_int(u, (int32_t)(uint32_t)v)))
                return -1;
            break;
        case 'K': /* BININT1 */
            if (arg_u(u, 1, "BININT1", &v) || push(u, new_int(u, (int64_t)v)))
                return -1;
            break;
        case 'M': /* BININT2 */
            if (arg_u(u, 2, "BININT2", &v) || push(u, new_int(u, (int64_t)v)))
                return -1;
            break;
        case 0x8a: /* LONG1: n-byte little-endian two's complement */
        case 0x8b: /* LONG4 */
            if (arg_u(u, op == 0x8a ? 1 : 4, op == 0x8a ? "LONG1" : "LONG4", &v))
                return -1;
            if (v > 8)
                return fail(u, DB_EUNSUPP, "integer of %llu bytes (at most 8 supported)", (unsigned long long)v);
            if (need(u, (size_t)v, "LONG"))
                return -1;
            iv = 0;
            if (v) {
                uint64_t x = rd_le(u->buf + u->pos, (int)v);
                if (v < 8 && (x >> (8 * v - 1)) & 1) /* sign-extend */
                    x |= ~(uint64_t)0 << (8 * v);
                memcpy(&iv, &x, sizeof iv);
            }
            u->pos += (size_t)v;
            if (push(u, new_int(u, iv)))
                return -1;
            break;
        case 'I': /* INT: decimal text; "00"/"01" are protocol 0's False/True */
            if (arg_line(u, "INT", 32, &s, &len))
                return -1;
            if (eq(s, len, "00") || eq(s, len, "01")) {
                if (push(u, s[1] == '1' ? &u->yes : &u->no))
                    return -1;
                break;
            }
            if (parse_decimal(u, s, len, "INT", &iv) || push(u, new_int(u, iv)))
                return -1;
            break;
        case 'G': { /* BINFLOAT: big-endian IEEE double */
            if (need(u, 8, "BINFLOAT"))
                return -1;
            uint64_t x = 0;
            for (int i = 0; i < 8; i++)
                x = (x << 8) | u->buf[u->pos + (size_t)i];
            u->pos += 8;
            if (!(o = new_obj(u, O_FLOAT)))
                return -1;
            memcpy(&o->u.f, &x, sizeof o->u.f);
            if (push(u, o))
                return -1;
            break;
        }

        /* strings and bytes: the length is checked against the input first */
        case 'X': /* BINUNICODE */
            if (arg_u(u, 4, "BINUNICODE", &v) || push_str(u, O_STR, v, "BINUNICODE"))
                return -1;
            break;
        case 0x8c: /* SHORT_BINUNICODE */
            if (arg_u(u, 1, "SHORT_BINUNICODE", &v) || push_str(u, O_STR, v, "SHORT_BINUNICODE"))
                return -1;
            break;
        case 0x8d: /* BINUNICODE8 */
            if (arg_u(u, 8, "BINUNICODE8", &v) || push_str(u, O_STR, v, "BINUNICODE8"))
                return -1;
            break;
        case 'T': /* BINSTRING: Python 2 str, read as text like torch does */
            if (arg_u(u, 4, "BINSTRING", &v))
                return -1;
            if (v & 0x80000000u)
                return fail(u, DB_EFORMAT, "BINSTRING with a negative length");
            if (push_str(u, O_STR, v, "BINSTRING"))
                return -1;
            break;
        case 'U': /* SHORT_BINSTRING */
            if (arg_u(u, 1, "SHORT_BINSTRING", &v) || push_str(u, O_STR, v, "SHORT_BINSTRING"))
                return -1;
            break;
        case 'C': /* SHORT_BINBYTES */
            if (arg_u(u, 1, "SHORT_BINBYTES", &v) || push_str(u, O_BYTES, v, "SHORT_BINBYTES"))
                return -1;
            break;
        case 'B': /* BINBYTES */
            if (arg_u(u, 4, "BINBYTES", &v) || push_str(u, O_BYTES, v, "BINBYTES"))
                return -1;
            break;
        case 0x8e: /* BINBYTES8 */
            if (arg_u(u, 8, "BINBYTES8", &v) || push_str(u, O_BYTES, v, "BINBYTES8"))
                return -1;
            break;

        /* containers */
        case '}': /* EMPTY_DICT */
            if (push(u, new_obj(u, O_DICT)))
                return -1;
            break;
        case ']': /* EMPTY_LIST */
            if (push(u, new_obj(u, O_LIST)))
                return -1;
            break;
        case ')': /* EMPTY_TUPLE */
            if (push(u, &u->empty_tuple))
                return -1;
            break;
        case '(': /* MARK */
            if (u->nmarks >= MAX_MARKS)
                return fail(u, DB_EFORMAT, "MARKs nested deeper than %d", MAX_MARKS);
            u->marks[u->nmarks++] = u->sp;
            break;
        case 't': /* TUPLE */
            if (pop_mark(u, "TUPLE", &start) || make_tuple(u, start))
                return -1;
            break;
        case 0x85: /* TUPLE1 */
        case 0x86: /* TUPLE2 */
        case 0x87: /* TUPLE3 */
            len = (size_t)(op - 0x84);
            if (u->sp < stack_floor(u) + len)
                return fail(u, DB_EFORMAT, "TUPLE%zu on a stack of %zu", len, u->sp - stack_floor(u));
            if (make_tuple(u, u->sp - len))
                return -1;
            break;
        case 'a': /* APPEND */
            if (u->sp <= stack_floor(u))
                return fail(u, DB_EFORMAT, "APPEND on an empty stack");
            if (add_items(u, u->sp - 1, O_LIST, "APPEND"))
                return -1;
            break;
        case 'e': /* APPENDS */
            if (pop_mark(u, "APPENDS", &start) || add_items(u, start, O_LIST, "APPENDS"))
                return -1;
            break;
        case 's': /* SETITEM */
            if (u->sp < stack_floor(u) + 2)
                return fail(u, DB_EFORMAT, "SETITEM on a stack of %zu", u->sp - stack_floor(u));
            if (add_items(u, u->sp - 2, O_DICT, "SETITEM"))
                return -1;
            break;
        case 'u': /* SETITEMS */
            if (pop_mark(u, "SETITEMS", &start) || add_items(u, start, O_DICT, "SETITEMS"))
                return -1;
            break;

        /* stack manipulation */
        case '0': /* POP */
            if (!pop(u, "POP"))
                return -1;
            break;
        case '1': /* POP_MARK */
            if (pop_mark(u, "POP_MARK", &start))
                return -1;
            u->sp = start;
            break;
        case '2': /* DUP */
            if (!(o = top(u, "DUP")) || push(u, o))
                return -1;
            break;

        /* memo */
        case 'q': /* BINPUT */
            if (arg_u(u, 1, "BINPUT", &v) || memo_put(u, v))
                return -1;
            break;
        case 'r': /* LONG_BINPUT */
            if (arg_u(u, 4, "LONG_BINPUT", &v) || memo_put(u, v))
                return -1;
            break;
        case 0x94: /* MEMOIZE: memo[len(memo)] = top, as in Python */
            if (memo_put(u, u->memo_len))
                return -1;
            break;
        case 'p': /* PUT: decimal text */
            if (arg_line(u, "PUT", 32, &s, &len) || parse_decimal(u, s, len, "PUT", &iv))
                return -1;
            if (iv < 0)
                return fail(u, DB_EFORMAT, "negative memo index");
            if (memo_put(u, (uint64_t)iv))
                return -1;
            break;
        case 'h': /* BINGET */
            if (arg_u(u, 1, "BINGET", &v) || memo_get(u, v))
                return -1;
            break;
        case 'j': /* LONG_BINGET */
            if (arg_u(u, 4, "LONG_BINGET", &v) || memo_get(u, v))
                return -1;
            break;
        case 'g': /* GET: decimal text */
            if (arg_line(u, "GET", 32, &s, &len) || parse_decimal(u, s, len, "GET", &iv))
                return -1;
            if (iv < 0)
                return fail(u, DB_EFORMAT, "negative memo index");
            if (memo_get(u, (uint64_t)iv))
                return -1;
            break;

        /* globals and calls */
        case 'c': /* GLOBAL "module\nname\n" */
            if (arg_line(u, "GLOBAL", MAX_GLOBAL, &s, &len) || arg_line(u, "GLOBAL", MAX_GLOBAL, &s2, &len2) ||
                push_global(u, s, len, s2, len2))
                return -1;
            break;
        case 0x93: /* STACK_GLOBAL: module and name strings from the stack */
            o2 = pop(u, "STACK_GLOBAL");
            o = o2 ? pop(u, "STACK_GLOBAL") : NULL;
            if (!o)
                return -1;
            if (o->kind != O_STR || o2->kind != O_STR)
                return fail(u, DB_EFORMAT, "STACK_GLOBAL needs two strings");
            if (push_global(u, o->u.s.p, o->u.s.n, o2->u.s.p, o2->u.s.n))
                return -1;
            break;
        case 'i': /* INST "module\nname\n": builds an instance; name the class if refused */
            if (arg_line(u, "INST", MAX_GLOBAL, &s, &len) || arg_line(u, "INST", MAX_GLOBAL, &s2, &len2) ||
                find_global(u, s, len, s2, len2) < 0)
                return -1;
            return fail(u, DB_EUNSUPP, "opcode INST is not supported");
        case 'R': /* REDUCE */
            if (reduce(u))
                return -1;
            break;
        case 'b': /* BUILD */
            if (build(u))
                return -1;
            break;
        case 'Q': /* BINPERSID */
            if (persistent_load(u))
                return -1;
            break;
        case 0x82: /* EXT1 */
        case 0x83: /* EXT2 */
        case 0x84: /* EXT4 */
            return fail(u, DB_ESECURITY, "pickle uses the extension registry (EXT opcodes), which is not allowed");
        case 'o': return fail(u, DB_EUNSUPP, "opcode OBJ is not supported");
        case 0x81: return fail(u, DB_EUNSUPP, "opcode NEWOBJ is not supported");
        case 0x92: return fail(u, DB_EUNSUPP, "opcode NEWOBJ_EX is not supported");
        case 'P': return fail(u, DB_EUNSUPP, "opcode PERSID (text persistent id) is not supported");
        default:
            if (op >= 0x20 && op < 0x7f)
                return fail(u, DB_EUNSUPP, "unsupported pickle opcode '%c' (0x%02x)", op, op);
            return fail(u, DB_EUNSUPP, "unsupported pickle opcode 0x%02x", op);
        }
    }
}

/* ---- the result -------------------------------------------------------- */

static int report(unpickler *u, const obj *sd, db_pickle_tensor_fn fn, void *ctx)
{
    for (size_t i = 0; i + 1 < sd->u.seq.n; i += 2) {
        const obj *k = sd->u.seq.v[i], *val = sd->u.seq.v[i + 1];
        if (val->kind != O_TENSOR || k->kind != O_STR)
            continue; /* global_step, epoch, nested dicts...: not tensors of this dict */
        char nm[160];
        if (strlen(k->u.s.p) != k->u.s.n)
            return db_err_set(u->err, DB_EFORMAT, "tensor name '%s' contains a NUL byte",
                              printable(nm, sizeof nm, k->u.s.p, k->u.s.n));
        const tensor_desc *t = val->u.t;
        db_pickle_tensor pt;
        memset(&pt, 0, sizeof pt);
        pt.name = k->u.s.p;
        pt.storage = t->storage->u.st.key;
        pt.location = t->storage->u.st.location;
        pt.dtype = t->storage->u.st.dtype;
        pt.storage_numel = t->storage->u.st.numel;
        pt.offset = t->offset;
        pt.ndim = t->ndim;
        for (int d = 0; d < t->ndim; d++) {
            pt.shape[d] = t->shape[d];
            pt.strides[d] = t->strides[d];
        }
        if (fn && fn(ctx, &pt, u->err))
            return -1;
    }
    return 0;
}

int db_pickle_tensors(const void *buf, size_t n, db_pickle_tensor_fn fn, void *ctx, db_err *err)
{
    unpickler u;
    memset(&u, 0, sizeof u);
    u.buf = buf;
    u.n = buf ? n : 0;
    u.err = err;
    u.none.kind = O_NONE;
    u.yes.kind = O_BOOL;
    u.yes.u.i = 1;
    u.no.kind = O_BOOL;
    u.empty_tuple.kind = O_TUPLE;
    db_arena_init(&u.arena, 1 << 16);

    obj *res = NULL;
    int rc = run(&u, &res);
    if (!rc && res->kind != O_DICT)
        rc = db_err_set(err, DB_EFORMAT, "pickle holds no dict of tensors");
    if (!rc) {
        const obj *sd = res;
        for (size_t i = 0; i + 1 < res->u.seq.n; i += 2)
            if (is_str(res->u.seq.v[i], "state_dict") && res->u.seq.v[i + 1]->kind == O_DICT)
                sd = res->u.seq.v[i + 1]; /* the last one wins, as in a Python dict */
        rc = report(&u, sd, fn, ctx);
    }
    db_arena_free(&u.arena);
    return rc;
}

int db_pickle_probe(const void *head, size_t n)
{
    const unsigned char *p = head;
    return n >= 2 && p[0] == 0x80 && p[1] >= 2 && p[1] <= 5;
}
