/*
 * npy: NumPy .npy reader/writer for the clnsa command-line tool. See npy.h.
 *
 * File layout (numpy.lib.format):
 *   "\x93NUMPY" major minor  header_len (uint16 LE for 1.0, uint32 LE for 2.0/3.0)
 *   header: an ASCII (3.0: UTF-8) Python dict literal, padded with spaces, ending '\n'
 *   data:   the raw elements, C order, byte order given by descr
 *
 * The input is untrusted: every read goes through an explicit length check, the header
 * is parsed by a small hand-written recursive-descent parser that only understands the
 * three keys numpy writes, and every size computation is overflow-checked.
 */
#include "npy.h"

#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAGIC_LEN 6
#define PREFIX_V1 10 /* magic, major, minor, uint16 header length */
#define PREFIX_V2 12 /* magic, major, minor, uint32 header length */
#define WRITE_ALIGN 64
#define READ_CHUNK ((size_t)1 << 16)
/* Headers for the types we accept are < 300 bytes; numpy itself refuses > 10000 by
 * default. A cap keeps a hostile 2.0 length field from making us buffer gigabytes. */
#define MAX_HEADER ((size_t)1 << 20)

static const unsigned char MAGIC[MAGIC_LEN] = {0x93, 'N', 'U', 'M', 'P', 'Y'};

/* numpy caps an array's byte size at the largest npy_intp; we also need it in size_t. */
static const uint64_t SIZE_LIMIT =
    (uint64_t)SIZE_MAX < (uint64_t)INT64_MAX ? (uint64_t)SIZE_MAX : (uint64_t)INT64_MAX;

typedef struct type_info {
  npy_type type;
  const char *descr;
  size_t size;
  const char *name;
} type_info;

static const type_info TYPES[] = {
    {NPY_F32, "<f4", 4, "float32"}, {NPY_F64, "<f8", 8, "float64"}, {NPY_F16, "<f2", 2, "float16"},
    {NPY_I32, "<i4", 4, "int32"},   {NPY_I64, "<i8", 8, "int64"},
};
#define NTYPES (sizeof TYPES / sizeof TYPES[0])

/* ------------------------------------------------------------------------- */
/* Small helpers                                                              */
/* ------------------------------------------------------------------------- */

#if defined(__GNUC__) || defined(__clang__)
static void set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
#endif

static void set_err(char *err, size_t errlen, const char *fmt, ...) {
  va_list ap;
  if (!err || errlen == 0) return;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
}

static const type_info *find_type(npy_type t) {
  size_t i;
  for (i = 0; i < NTYPES; i++)
    if (TYPES[i].type == t) return &TYPES[i];
  return NULL;
}

/* The file format is little-endian; detect the host at run time so that the code
 * needs no configure step and stays correct on big-endian machines. */
static int host_is_le(void) {
  const uint16_t one = 1;
  unsigned char b;
  memcpy(&b, &one, 1);
  return b == 1;
}

static void swap_elems(unsigned char *p, size_t count, size_t size) {
  size_t i, j;
  for (i = 0; i < count; i++, p += size)
    for (j = 0; j < size / 2; j++) {
      unsigned char t = p[j];
      p[j] = p[size - 1 - j];
      p[size - 1 - j] = t;
    }
}

/* malloc for count elements; at least one byte so that success is never NULL. */
static void *alloc_elems(size_t count, size_t size) {
  if (size != 0 && count > SIZE_MAX / size) return NULL;
  return malloc(count * size > 0 ? count * size : 1);
}

/* Element count and byte size of a shape. Like numpy, the product of the nonzero
 * dimensions times the item size must fit (numpy: "array is too big") even when a
 * zero dimension makes the array empty. */
static int shape_size(int ndim, const int64_t *shape, size_t itemsize, size_t *count, size_t *bytes,
                      char *err, size_t errlen) {
  uint64_t n = itemsize;
  int d, empty = 0;
  for (d = 0; d < ndim; d++) {
    uint64_t dim = (uint64_t)shape[d];
    if (dim == 0) {
      empty = 1;
      continue;
    }
    if (n > SIZE_LIMIT / dim) {
      set_err(err, errlen, "shape overflows: byte size exceeds %llu",
              (unsigned long long)SIZE_LIMIT);
      return -1;
    }
    n *= dim;
  }
  *count = empty ? 0 : (size_t)(n / itemsize);
  *bytes = empty ? 0 : (size_t)n;
  return 0;
}

/* ------------------------------------------------------------------------- */
/* Prefix: magic, version, header length                                      */
/* ------------------------------------------------------------------------- */

typedef struct prefix {
  size_t hoff; /* where the header dict starts */
  size_t hlen; /* its declared length */
} prefix;

/* Parses the fixed prefix. It does not check hlen against the file so that
 * npy_read_file can use it on the first few bytes to size its read. */
static int parse_prefix(const unsigned char *b, size_t len, prefix *px, char *err, size_t errlen) {
  size_t i;
  for (i = 0; i < MAGIC_LEN && i < len; i++)
    if (b[i] != MAGIC[i]) {
      set_err(err, errlen, "not a .npy file: bad magic (expected \\x93NUMPY)");
      return -1;
    }
  if (len < MAGIC_LEN + 2) {
    set_err(err, errlen, "truncated: %zu bytes is too short for a .npy magic and version", len);
    return -1;
  }
  if (b[6] < 1 || b[6] > 3 || b[7] != 0) {
    set_err(err, errlen, "unsupported .npy format version %u.%u (expected 1.0, 2.0 or 3.0)",
            (unsigned)b[6], (unsigned)b[7]);
    return -1;
  }
  px->hoff = b[6] == 1 ? PREFIX_V1 : PREFIX_V2;
  if (len < px->hoff) {
    set_err(err, errlen, "truncated: file ends inside the header length field");
    return -1;
  }
  px->hlen = (size_t)b[8] | (size_t)b[9] << 8;
  if (b[6] != 1) px->hlen |= (size_t)b[10] << 16 | (size_t)b[11] << 24;
  if (px->hlen > MAX_HEADER) {
    set_err(err, errlen, "oversized header: %zu bytes (at most %zu)", px->hlen, MAX_HEADER);
    return -1;
  }
  return 0;
}

/* ------------------------------------------------------------------------- */
/* Header dict parser                                                         */
/* ------------------------------------------------------------------------- */

typedef struct cursor {
  const char *s;
  size_t n, i;
  char *err;
  size_t errlen;
} cursor;

typedef struct span {
  const char *p;
  size_t n;
} span;

enum { KEY_DESCR, KEY_FORTRAN, KEY_SHAPE, KEY_COUNT };
static const char *const KEY_NAMES[KEY_COUNT] = {"descr", "fortran_order", "shape"};

typedef struct header {
  int seen[KEY_COUNT];
  npy_type type;
  int ndim;
  int64_t shape[NPY_MAX_DIMS];
} header;

static int fail_at(cursor *c, const char *what) {
  set_err(c->err, c->errlen, "malformed header: %s at offset %zu", what, c->i);
  return -1;
}

static int peek(const cursor *c) {
  return c->i < c->n ? (unsigned char)c->s[c->i] : -1;
}

static int is_ws(int ch) {
  return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\n';
}

static void skip_ws(cursor *c) {
  while (is_ws(peek(c))) c->i++;
}

/* Skips whitespace, then consumes ch if it is next. */
static int accept(cursor *c, char ch) {
  skip_ws(c);
  if (peek(c) != (unsigned char)ch) return 0;
  c->i++;
  return 1;
}

static int span_eq(span s, const char *lit) {
  size_t n = strlen(lit);
  return s.n == n && memcmp(s.p, lit, n) == 0;
}

/* Copies a span for a message: at most 40 bytes, non-printable bytes as '?', so
 * that hostile input cannot put control characters on the user's terminal. */
static const char *show(span s, char out[48]) {
  size_t i, n = s.n < 40 ? s.n : 40;
  for (i = 0; i < n; i++) {
    unsigned char ch = (unsigned char)s.p[i];
    out[i] = ch >= 0x20 && ch < 0x7f ? (char)ch : '?';
  }
  strcpy(out + n, s.n > n ? "..." : "");
  return out;
}

/* A Python string literal in ' or " quotes. Escapes never occur in the headers numpy
 * writes, so a backslash is rejected instead of being interpreted. */
static int parse_string(cursor *c, span *out) {
  int q;
  size_t start;
  skip_ws(c);
  q = peek(c);
  if (q != '\'' && q != '"') return fail_at(c, "expected a quoted string");
  start = ++c->i;
  while (c->i < c->n && c->s[c->i] != (char)q) {
    if (c->s[c->i] == '\\') return fail_at(c, "escape sequences are not supported");
    if (c->s[c->i] == '\n') return fail_at(c, "newline inside a string");
    c->i++;
  }
  if (c->i >= c->n) return fail_at(c, "unterminated string");
  out->p = c->s + start;
  out->n = c->i - start;
  c->i++;
  return 0;
}

static int reject_descr(cursor *c, span s) {
  char buf[48];
  const char *shown = show(s, buf);
  int order = s.n > 0 ? s.p[0] : 0;
  size_t k = order == '<' || order == '>' || order == '|' || order == '=' ? 1 : 0;
  if (order == '>')
    set_err(c->err, c->errlen,
            "big-endian descr '%s' is not supported (save with arr.astype('<%s'))", shown,
            shown + 1);
  else if (s.n > k && s.p[k] == 'O')
    set_err(c->err, c->errlen, "object arrays (descr '%s') are not supported", shown);
  else
    set_err(c->err, c->errlen,
            "unsupported descr '%s' (supported: '<f4', '<f8', '<f2', '<i4', '<i8')", shown);
  return -1;
}

static int parse_descr(cursor *c, header *h) {
  span s;
  size_t t;
  skip_ws(c);
  if (peek(c) == '[') {
    set_err(c->err, c->errlen, "unsupported descr: structured dtypes are not supported");
    return -1;
  }
  if (parse_string(c, &s) != 0) return -1;
  for (t = 0; t < NTYPES; t++)
    if (span_eq(s, TYPES[t].descr)) {
      h->type = TYPES[t].type;
      return 0;
    }
  return reject_descr(c, s);
}

static int is_ident_char(int ch) {
  return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
         ch == '_';
}

/* Matches a bare word (True, False) that is not the prefix of a longer name. */
static int accept_word(cursor *c, const char *w) {
  size_t n = strlen(w);
  skip_ws(c);
  if (c->n - c->i < n || memcmp(c->s + c->i, w, n) != 0) return 0;
  if (c->i + n < c->n && is_ident_char((unsigned char)c->s[c->i + n])) return 0;
  c->i += n;
  return 1;
}

static int parse_fortran(cursor *c) {
  if (accept_word(c, "False")) return 0;
  if (accept_word(c, "True")) {
    set_err(c->err, c->errlen,
            "fortran_order True is not supported (save a C-ordered array, "
            "e.g. np.ascontiguousarray)");
    return -1;
  }
  return fail_at(c, "fortran_order must be True or False");
}

/* A non-negative decimal integer that fits int64. A trailing 'L' is skipped: numpy
 * under Python 2 wrote long dimensions as "3L" and numpy still reads such files. */
static int parse_dim(cursor *c, int64_t *out) {
  int64_t v = 0;
  skip_ws(c);
  if (peek(c) == '-') {
    set_err(c->err, c->errlen, "negative dimension in shape at offset %zu", c->i);
    return -1;
  }
  if (peek(c) < '0' || peek(c) > '9') return fail_at(c, "expected a dimension");
  while (peek(c) >= '0' && peek(c) <= '9') {
    int digit = peek(c) - '0';
    if (v > (INT64_MAX - digit) / 10) {
      set_err(c->err, c->errlen, "dimension overflows int64 at offset %zu", c->i);
      return -1;
    }
    v = v * 10 + digit;
    c->i++;
  }
  if (peek(c) == 'L') c->i++;
  *out = v;
  return 0;
}

/* A Python tuple of ints: "()", "(5,)", "(2, 3)", "(2, 3,)". "(5)" is an int in
 * Python, not a tuple, and numpy rejects it, so we do too. */
static int parse_shape(cursor *c, header *h) {
  h->ndim = 0;
  if (!accept(c, '(')) return fail_at(c, "shape must be a tuple");
  if (accept(c, ')')) return 0;
  for (;;) {
    if (h->ndim == NPY_MAX_DIMS) {
      set_err(c->err, c->errlen, "shape has more than %d dimensions", NPY_MAX_DIMS);
      return -1;
    }
    if (parse_dim(c, &h->shape[h->ndim++]) != 0) return -1;
    if (accept(c, ',')) {
      if (accept(c, ')')) return 0;
      continue;
    }
    if (!accept(c, ')')) return fail_at(c, "expected ',' or ')' in shape");
    if (h->ndim == 1) return fail_at(c, "shape (n) is not a tuple, expected (n,)");
    return 0;
  }
}

static int parse_entry(cursor *c, header *h) {
  span key;
  int k;
  char buf[48];
  if (parse_string(c, &key) != 0) return -1;
  for (k = 0; k < KEY_COUNT; k++)
    if (span_eq(key, KEY_NAMES[k])) break;
  if (k == KEY_COUNT) {
    set_err(c->err, c->errlen, "malformed header: unexpected key '%s'", show(key, buf));
    return -1;
  }
  if (h->seen[k]) {
    set_err(c->err, c->errlen, "malformed header: duplicate key '%s'", KEY_NAMES[k]);
    return -1;
  }
  h->seen[k] = 1;
  if (!accept(c, ':')) return fail_at(c, "expected ':'");
  if (k == KEY_DESCR) return parse_descr(c, h);
  if (k == KEY_FORTRAN) return parse_fortran(c);
  return parse_shape(c, h);
}

static int parse_dict(cursor *c, header *h) {
  int k;
  if (!accept(c, '{')) return fail_at(c, "expected '{'");
  for (;;) {
    if (accept(c, '}')) break; /* empty dict, or a trailing comma */
    if (parse_entry(c, h) != 0) return -1;
    if (accept(c, ',')) continue;
    if (accept(c, '}')) break;
    return fail_at(c, "expected ',' or '}'");
  }
  skip_ws(c); /* numpy pads with spaces and a final '\n' */
  if (c->i != c->n) return fail_at(c, "unexpected text after '}'");
  for (k = 0; k < KEY_COUNT; k++)
    if (!h->seen[k]) {
      set_err(c->err, c->errlen, "malformed header: missing key '%s'", KEY_NAMES[k]);
      return -1;
    }
  return 0;
}

/* ------------------------------------------------------------------------- */
/* Parsing a whole file                                                       */
/* ------------------------------------------------------------------------- */

static int load_data(const unsigned char *b, size_t len, size_t off, const header *h,
                     size_t max_bytes, npy_array *out, char *err, size_t errlen) {
  const type_info *ti = find_type(h->type);
  size_t count, bytes, have = len - off;
  void *data;
  if (shape_size(h->ndim, h->shape, ti->size, &count, &bytes, err, errlen) != 0) return -1;
  if (bytes > max_bytes) {
    set_err(err, errlen, "oversized: %zu bytes of data exceed the limit of %zu bytes", bytes,
            max_bytes);
    return -1;
  }
  if (have != bytes) {
    set_err(err, errlen, "%s: header says %zu bytes of data, file has %zu",
            have < bytes ? "truncated" : "trailing bytes", bytes, have);
    return -1;
  }
  data = alloc_elems(count, ti->size);
  if (!data) {
    set_err(err, errlen, "out of memory allocating %zu bytes", bytes);
    return -1;
  }
  if (bytes) memcpy(data, b + off, bytes);
  if (!host_is_le()) swap_elems(data, count, ti->size);
  out->type = h->type;
  out->ndim = h->ndim;
  memcpy(out->shape, h->shape, sizeof out->shape);
  out->count = count;
  out->data = data;
  return 0;
}

int npy_parse(const void *buf, size_t len, size_t max_bytes, npy_array *out, char *err,
              size_t errlen) {
  const unsigned char *b = buf;
  prefix px;
  header h;
  cursor c;
  if (!out || (!buf && len)) {
    set_err(err, errlen, "npy_parse: NULL %s", out ? "buffer" : "output");
    return -1;
  }
  memset(out, 0, sizeof *out);
  if (parse_prefix(b, len, &px, err, errlen) != 0) return -1;
  if (px.hlen > len - px.hoff) {
    set_err(err, errlen,
            "truncated: header length %zu goes beyond the end of the file (%zu bytes left)",
            px.hlen, len - px.hoff);
    return -1;
  }
  memset(&h, 0, sizeof h);
  c.s = (const char *)b + px.hoff;
  c.n = px.hlen;
  c.i = 0;
  c.err = err;
  c.errlen = errlen;
  if (parse_dict(&c, &h) != 0) return -1;
  return load_data(b, len, px.hoff + px.hlen, &h, max_bytes, out, err, errlen);
}

/* ------------------------------------------------------------------------- */
/* Files                                                                      */
/* ------------------------------------------------------------------------- */

/* Grows buf to hold at least size+1 bytes, never beyond cap+1 (one byte past the cap
 * is all that is needed to detect an oversized file). */
static int grow(unsigned char **buf, size_t *alloc, size_t cap) {
  size_t want = *alloc < READ_CHUNK ? READ_CHUNK : *alloc > SIZE_MAX / 2 ? SIZE_MAX : *alloc * 2;
  unsigned char *nb;
  if (cap < SIZE_MAX && want > cap + 1) want = cap + 1;
  nb = realloc(*buf, want);
  if (!nb) return -1;
  *buf = nb;
  *alloc = want;
  return 0;
}

/* Reads the rest of f after the head bytes already read, failing as oversized once
 * more than cap bytes arrive, so a huge or endless input is never fully buffered.
 * Works on pipes: nothing is re-read or seeked. */
static int read_capped(FILE *f, const unsigned char *head, size_t headlen, size_t cap,
                       unsigned char **out, size_t *outlen, char *err, size_t errlen) {
  unsigned char *buf = NULL;
  size_t size = headlen, alloc = 0, n;
  const char *why = "oversized: file is larger than its header plus max_bytes";
  if (headlen > cap) goto fail;
  why = "out of memory reading file";
  if (grow(&buf, &alloc, cap) != 0) goto fail; /* alloc > cap >= headlen, or 64 KiB */
  memcpy(buf, head, headlen);
  for (;;) { /* invariant: alloc > size */
    n = fread(buf + size, 1, alloc - size, f);
    size += n;
    if (size > cap || n == 0) break;
    if (size == alloc && grow(&buf, &alloc, cap) != 0) goto fail;
  }
  why = size > cap ? "oversized: file is larger than its header plus max_bytes" : "read error";
  if (size > cap || ferror(f)) goto fail;
  *out = buf;
  *outlen = size;
  return 0;
fail:
  free(buf);
  set_err(err, errlen, "%s", why);
  return -1;
}

/* Reads the prefix and computes the largest file worth reading: prefix + header +
 * max_bytes of data, saturating. Returns -1 for a bad prefix: then the few bytes read
 * are all npy_parse needs to say what is wrong. */
static int read_head(FILE *f, unsigned char head[PREFIX_V2], size_t *headlen, size_t max_bytes,
                     size_t *cap) {
  prefix px;
  size_t fixed;
  *headlen = fread(head, 1, PREFIX_V2, f);
  if (parse_prefix(head, *headlen, &px, NULL, 0) != 0) return -1;
  fixed = px.hoff + px.hlen;
  *cap = max_bytes > SIZE_MAX - fixed ? SIZE_MAX : fixed + max_bytes;
  return 0;
}

int npy_read_file(const char *path, size_t max_bytes, npy_array *out, char *err, size_t errlen) {
  FILE *f;
  unsigned char head[PREFIX_V2], *buf = NULL;
  size_t headlen, cap, len = 0;
  int rc;
  if (out) memset(out, 0, sizeof *out);
  if (!path || !out) {
    set_err(err, errlen, "npy_read_file: NULL %s", path ? "output" : "path");
    return -1;
  }
  f = fopen(path, "rb");
  if (!f) {
    set_err(err, errlen, "cannot open '%s': %s", path, strerror(errno));
    return -1;
  }
  if (read_head(f, head, &headlen, max_bytes, &cap) != 0)
    rc = npy_parse(head, headlen, max_bytes, out, err, errlen); /* fails, explains */
  else if ((rc = read_capped(f, head, headlen, cap, &buf, &len, err, errlen)) == 0)
    rc = npy_parse(buf, len, max_bytes, out, err, errlen);
  fclose(f);
  free(buf);
  if (rc != 0 && err && errlen) {
    /* Name the file: the CLI reads several and the message must say which. */
    char tmp[512];
    snprintf(tmp, sizeof tmp, "%s", err);
    set_err(err, errlen, "%s: %s", path, tmp);
  }
  return rc;
}

/* The header numpy writes: dict, spaces, '\n', data aligned to WRITE_ALIGN. Returns
 * the total prefix+header length written into buf (always < cap: see the bound). */
static size_t format_header(const type_info *ti, int ndim, const int64_t *shape, char *buf,
                            size_t cap) {
  size_t pos = PREFIX_V1, hlen;
  int d;
  memcpy(buf, MAGIC, MAGIC_LEN);
  buf[6] = 1;
  buf[7] = 0;
  pos += (size_t)snprintf(buf + pos, cap - pos,
                          "{'descr': '%s', 'fortran_order': False, 'shape': (", ti->descr);
  for (d = 0; d < ndim; d++)
    pos += (size_t)snprintf(buf + pos, cap - pos, "%s%lld", d ? ", " : "", (long long)shape[d]);
  pos += (size_t)snprintf(buf + pos, cap - pos, "%s), }", ndim == 1 ? "," : "");
  while ((pos + 1) % WRITE_ALIGN != 0) buf[pos++] = ' ';
  buf[pos++] = '\n';
  hlen = pos - PREFIX_V1;
  buf[8] = (char)(hlen & 0xff);
  buf[9] = (char)(hlen >> 8);
  return pos;
}

/* Writes elements little-endian; on a big-endian host through a swapped copy. */
static int write_le(FILE *f, const void *data, size_t count, size_t size) {
  const unsigned char *p = data;
  unsigned char tmp[4096];
  size_t per = sizeof tmp / size;
  if (count == 0) return 0;
  if (host_is_le()) return fwrite(p, size, count, f) == count ? 0 : -1;
  while (count > 0) {
    size_t n = count < per ? count : per;
    memcpy(tmp, p, n * size);
    swap_elems(tmp, n, size);
    if (fwrite(tmp, size, n, f) != n) return -1;
    p += n * size;
    count -= n;
  }
  return 0;
}

static int check_write_args(const char *path, const type_info *ti, int ndim, const int64_t *shape,
                            char *err, size_t errlen) {
  int d;
  if (!path || !ti) {
    set_err(err, errlen, "npy_write_file: %s", path ? "unknown npy_type" : "NULL path");
    return -1;
  }
  if (ndim < 0 || ndim > NPY_MAX_DIMS || (ndim > 0 && !shape)) {
    set_err(err, errlen, "npy_write_file: ndim %d out of range 0..%d or NULL shape", ndim,
            NPY_MAX_DIMS);
    return -1;
  }
  for (d = 0; d < ndim; d++)
    if (shape[d] < 0) {
      set_err(err, errlen, "npy_write_file: negative dimension %lld at axis %d",
              (long long)shape[d], d);
      return -1;
    }
  return 0;
}

int npy_write_file(const char *path, npy_type type, int ndim, const int64_t *shape,
                   const void *data, char *err, size_t errlen) {
  const type_info *ti = find_type(type);
  char hdr[512]; /* bound: 10 + ~60 + 8 dims * 21 chars, padded to 64: < 320 */
  size_t count, bytes, hlen;
  FILE *f;
  int ok;
  if (check_write_args(path, ti, ndim, shape, err, errlen) != 0) return -1;
  if (shape_size(ndim, shape, ti->size, &count, &bytes, err, errlen) != 0) return -1;
  if (bytes && !data) {
    set_err(err, errlen, "npy_write_file: NULL data for %zu elements", count);
    return -1;
  }
  hlen = format_header(ti, ndim, shape, hdr, sizeof hdr);
  f = fopen(path, "wb");
  if (!f) {
    set_err(err, errlen, "cannot create '%s': %s", path, strerror(errno));
    return -1;
  }
  ok = fwrite(hdr, 1, hlen, f) == hlen && write_le(f, data, count, ti->size) == 0;
  if (fclose(f) != 0) ok = 0;
  if (!ok) {
    /* The partial file is left in place: path may name a device or a link (/dev/stdout)
     * that must not be deleted, and the caller learns of the failure from -1. */
    set_err(err, errlen, "writing '%s' failed: %s", path, strerror(errno));
    return -1;
  }
  return 0;
}

void npy_free(npy_array *a) {
  if (!a) return;
  free(a->data);
  memset(a, 0, sizeof *a);
}

/* ------------------------------------------------------------------------- */
/* Conversions                                                                */
/* ------------------------------------------------------------------------- */

static int check_array(const npy_array *a, const char *fn, char *err, size_t errlen) {
  if (!a || !find_type(a->type) || (a->count > 0 && !a->data)) {
    set_err(err, errlen, "%s: NULL or invalid array", fn);
    return -1;
  }
  return 0;
}

/* IEEE binary16 -> binary32. Every half is exactly a float, so this is exact. */
static float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (uint32_t)(h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  float f;
  if (exp == 0) { /* zero or subnormal: man * 2^-24, exact in float */
    f = (float)man * 0x1p-24f;
    return sign ? -f : f;
  }
  if (exp == 31)
    bits = sign | 0x7f800000u | man << 13; /* inf, or NaN keeping its payload */
  else
    bits = sign | (exp + 112u) << 23 | man << 13; /* rebias 15 -> 127 */
  memcpy(&f, &bits, sizeof f);
  return f;
}

/* double -> float, rounding to nearest. A finite double at or beyond FLT_MAX plus half
 * an ulp would round to inf: reject it. Between FLT_MAX and that bound the rounded
 * result is FLT_MAX; assign it explicitly because C leaves the cast undefined there. */
static int double_to_float(double d, float *out) {
  static const double round_limit = 0x1.ffffffp127;
  double m = d < 0 ? -d : d;
  if (m > DBL_MAX) {
    *out = d < 0 ? -INFINITY : INFINITY;
  } else if (m >= round_limit) {
    return -1;
  } else if (m > (double)FLT_MAX) {
    *out = d < 0 ? -FLT_MAX : FLT_MAX;
  } else {
    *out = (float)d; /* also NaN: comparisons above are false for it */
  }
  return 0;
}

static int f64_to_f32(const npy_array *a, float *dst, char *err, size_t errlen) {
  size_t i;
  for (i = 0; i < a->count; i++) {
    double d;
    memcpy(&d, (const unsigned char *)a->data + i * sizeof d, sizeof d);
    if (double_to_float(d, &dst[i]) != 0) {
      set_err(err, errlen, "float64 value %g at index %zu is out of float32 range", d, i);
      return -1;
    }
  }
  return 0;
}

float *npy_to_f32(const npy_array *a, char *err, size_t errlen) {
  float *dst;
  size_t i;
  if (check_array(a, "npy_to_f32", err, errlen) != 0) return NULL;
  if (a->type == NPY_I32 || a->type == NPY_I64) {
    set_err(err, errlen, "cannot convert %s to float32: integer arrays are not converted",
            npy_type_name(a->type));
    return NULL;
  }
  dst = alloc_elems(a->count, sizeof *dst);
  if (!dst) {
    set_err(err, errlen, "out of memory converting %zu elements", a->count);
    return NULL;
  }
  if (a->type == NPY_F32 && a->count) memcpy(dst, a->data, a->count * sizeof *dst);
  for (i = 0; a->type == NPY_F16 && i < a->count; i++) {
    uint16_t h;
    memcpy(&h, (const unsigned char *)a->data + i * sizeof h, sizeof h);
    dst[i] = half_to_float(h);
  }
  if (a->type == NPY_F64 && f64_to_f32(a, dst, err, errlen) != 0) {
    free(dst);
    return NULL;
  }
  return dst;
}

static int i64_to_i32(const npy_array *a, int32_t *dst, char *err, size_t errlen) {
  size_t i;
  for (i = 0; i < a->count; i++) {
    int64_t v;
    memcpy(&v, (const unsigned char *)a->data + i * sizeof v, sizeof v);
    if (v < INT32_MIN || v > INT32_MAX) {
      set_err(err, errlen, "int64 value %lld at index %zu is out of int32 range", (long long)v, i);
      return -1;
    }
    dst[i] = (int32_t)v;
  }
  return 0;
}

int32_t *npy_to_i32(const npy_array *a, char *err, size_t errlen) {
  int32_t *dst;
  if (check_array(a, "npy_to_i32", err, errlen) != 0) return NULL;
  if (a->type != NPY_I32 && a->type != NPY_I64) {
    set_err(err, errlen, "cannot convert %s to int32: only integer arrays are converted",
            npy_type_name(a->type));
    return NULL;
  }
  dst = alloc_elems(a->count, sizeof *dst);
  if (!dst) {
    set_err(err, errlen, "out of memory converting %zu elements", a->count);
    return NULL;
  }
  if (a->type == NPY_I32 && a->count) memcpy(dst, a->data, a->count * sizeof *dst);
  if (a->type == NPY_I64 && i64_to_i32(a, dst, err, errlen) != 0) {
    free(dst);
    return NULL;
  }
  return dst;
}

const char *npy_type_name(npy_type t) {
  const type_info *ti = find_type(t);
  return ti ? ti->name : "unknown";
}
