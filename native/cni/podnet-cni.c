/* podnet-cni: the CNI plugin executable (CNI spec 1.1).
 *
 * A thin client of the node agent. It answers VERSION itself and sends every other
 * request to the agent's unix socket as one JSON document
 *     {"env": {every CNI_* variable}, "stdin": <the network configuration, as text>}
 * then half-closes and reads the agent's one-document answer
 *     {"code": <int>, "output": <text for stdout>}
 * (podnet.cni.server is the other end). The output goes to stdout unchanged; the exit
 * status is 0 when code is 0, else 1. Whatever happens, a failure leaves one CNI error
 * document on stdout:
 *     {"cniVersion": ..., "code": N, "msg": ..., "details": ...}
 *
 * Errors produced here (the agent produces the rest):
 *     4   CNI_COMMAND missing or unknown
 *     5   stdin could not be read
 *     6   stdin is not UTF-8 JSON, or not a JSON object
 *     7   agentSocket / agentTimeout in the network configuration are invalid
 *     11  the agent is not reachable: no socket, connection refused, or no answer in time
 *     999 anything unexpected (a malformed answer from the agent, out of memory)
 *
 * Statically linked, because the runtime runs it for every pod on hosts that have nothing
 * of podnet's. The plugin used to be Python, and the agent decodes with Python's json
 * module: so the JSON reader here accepts and rejects what json.loads does, with the same
 * messages and positions, and the request is byte for byte what json.dumps wrote.
 *
 * Text is held as UTF-8, a lone surrogate (from a \udXXX escape, or U+DC80 + byte for an
 * environment byte that is not UTF-8, as Python's surrogateescape) in its 3-byte form.
 *
 * The same executable is the IPAM plugin podnet-ipam when run under that name (installed
 * twice; argv[0] decides): a macvlan, vlan, ... configuration in any runtime or meta-plugin
 * names "ipam": {"type": "podnet-ipam", "pools": [...], "agentSocket": ...}, and the agent
 * allocates from podnet's IPAM. Then agentSocket and agentTimeout are read from the ipam
 * object, and the request carries one more member: {"env": ..., "stdin": ..., "plugin":
 * "podnet-ipam"}. Everything else (VERSION, errors, the answer) is the same.
 *
 * Build (as python -m podnet.cni.install does): gcc -static -O2 -s -o podnet-cni podnet-cni.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <libgen.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define LATEST "1.1.0"
#define IPAM_NAME "podnet-ipam" /* the name that makes this executable the IPAM plugin */
#define DEFAULT_SOCKET "/run/podnet/cni.sock" /* the agent's default too (podnet agent --socket) */
#define DEFAULT_REPLY_TIMEOUT 120.0           /* seconds for the answer: an ADD may wait on the store */
#define MAX_REPLY (16 << 20)
#define SUN_PATH_MAX 107    /* bytes in sockaddr_un.sun_path, without the terminating NUL */
#define MAX_INT_DIGITS 4300 /* Python's limit for int(str), which json.loads applies to integers */
#define MAX_DEPTH 994       /* the deepest nesting json.loads took: its recursion limit less the plugin's frames */

static const char *const SUPPORTED[] = {"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"};
static const char *const COMMANDS[] = {"ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION"};
#define EXPECTED_COMMAND "expected one of ADD, DEL, CHECK, STATUS, GC, VERSION"
#define AGENT_DOWN "is the podnet agent running on this node? The runtime may retry."
#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

/* The entry of set equal to s[0..len), or NULL. */
static const char *member(const char *const *set, size_t n, const char *s, size_t len)
{
    for (size_t i = 0; i < n; i++)
        if (strlen(set[i]) == len && memcmp(set[i], s, len) == 0)
            return set[i];
    return NULL;
}

/* ---------------------------------------------------------------- growable strings */

typedef struct {
    char *p;
    size_t n, cap;
} Buf;

static _Noreturn void fail_memory(void);

/* Room for n more bytes and a terminating NUL (so p is a C string whenever it holds no NUL). */
static void reserve(Buf *b, size_t n)
{
    if (b->n + n + 1 <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->n + n + 1)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p)
        fail_memory();
    b->p = p;
    b->cap = cap;
}

static void put(Buf *b, const void *s, size_t n)
{
    reserve(b, n);
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}

static void puts_(Buf *b, const char *s) { put(b, s, strlen(s)); }
static void putch(Buf *b, char c) { put(b, &c, 1); }

static void vputf(Buf *b, const char *fmt, va_list ap)
{
    va_list again;
    va_copy(again, ap);
    int n = vsnprintf(NULL, 0, fmt, ap);
    reserve(b, n > 0 ? n : 0);
    vsnprintf(b->p + b->n, n > 0 ? n + 1 : 1, fmt, again);
    b->n += n > 0 ? n : 0;
    va_end(again);
}

static void putf(Buf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vputf(b, fmt, ap);
    va_end(ap);
}

static void put_cp(Buf *b, unsigned cp)
{
    unsigned char u[4];
    size_t n;
    if (cp < 0x80) {
        u[0] = cp, n = 1;
    } else if (cp < 0x800) {
        u[0] = 0xC0 | cp >> 6, u[1] = 0x80 | (cp & 0x3F), n = 2;
    } else if (cp < 0x10000) {
        u[0] = 0xE0 | cp >> 12, u[1] = 0x80 | ((cp >> 6) & 0x3F), u[2] = 0x80 | (cp & 0x3F), n = 3;
    } else {
        u[0] = 0xF0 | cp >> 18, u[1] = 0x80 | ((cp >> 12) & 0x3F), u[2] = 0x80 | ((cp >> 6) & 0x3F);
        u[3] = 0x80 | (cp & 0x3F), n = 4;
    }
    put(b, u, n);
}

/* The code point at s[*i] of well-formed text; advances *i past it. */
static unsigned next_cp(const char *s, size_t *i)
{
    const unsigned char *u = (const unsigned char *)s + *i;
    if (u[0] < 0x80)
        return *i += 1, u[0];
    if (u[0] < 0xE0)
        return *i += 2, (u[0] & 0x1Fu) << 6 | (u[1] & 0x3Fu);
    if (u[0] < 0xF0)
        return *i += 3, (u[0] & 0x0Fu) << 12 | (u[1] & 0x3Fu) << 6 | (u[2] & 0x3Fu);
    return *i += 4, (u[0] & 0x07u) << 18 | (u[1] & 0x3Fu) << 12 | (u[2] & 0x3Fu) << 6 | (u[3] & 0x3Fu);
}

static int surrogate(unsigned c) { return c >= 0xD800 && c <= 0xDFFF; }

/* Length of the valid UTF-8 sequence at s[i], or 0 and *why in the words of Python's decoder. */
static int utf8_seq(const unsigned char *s, size_t n, size_t i, const char **why)
{
    unsigned c = s[i];
    if (c < 0x80)
        return 1;
    if (c < 0xC2 || c > 0xF4)
        return *why = "invalid start byte", 0;
    int len = c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
    /* The second byte's range rules out overlong forms, surrogates and code points past U+10FFFF. */
    unsigned lo = c == 0xE0 ? 0xA0 : c == 0xF0 ? 0x90 : 0x80;
    unsigned hi = c == 0xED ? 0x9F : c == 0xF4 ? 0x8F : 0xBF;
    for (int k = 1; k < len; k++, lo = 0x80, hi = 0xBF) {
        if (i + k >= n)
            return *why = "unexpected end of data", 0;
        if (s[i + k] < lo || s[i + k] > hi)
            return *why = "invalid continuation byte", 0;
    }
    return len;
}

/* Offset of the first byte that is not valid UTF-8, or n. */
static size_t utf8_check(const char *s, size_t n, const char **why)
{
    for (size_t i = 0; i < n;) {
        int len = utf8_seq((const unsigned char *)s, n, i, why);
        if (!len)
            return i;
        i += len;
    }
    return n;
}

/* Bytes from the environment as Python decodes them: UTF-8, other bytes as U+DC80 + byte. */
static void put_escaped_bytes(Buf *b, const char *s, size_t n)
{
    const char *why;
    for (size_t i = 0; i < n;) {
        int len = utf8_seq((const unsigned char *)s, n, i, &why);
        if (len)
            put(b, s + i, len), i += len;
        else
            put_cp(b, 0xDC00 + (unsigned char)s[i++]);
    }
}

static const char HEX[] = "0123456789abcdef";

static void put_u_escape(Buf *b, const char *u, unsigned c, int digits)
{
    puts_(b, u);
    while (digits--)
        putch(b, HEX[(c >> (4 * digits)) & 15]);
}

/* A JSON string, ASCII only, as json.dumps writes it. */
static void put_json_string(Buf *b, const char *s, size_t n)
{
    putch(b, '"');
    for (size_t i = 0; i < n;) {
        unsigned c = next_cp(s, &i);
        const char *esc = c == '\\' ? "\\\\" : c == '"' ? "\\\"" : c == '\b' ? "\\b" : c == '\f' ? "\\f"
                        : c == '\n' ? "\\n" : c == '\r' ? "\\r" : c == '\t' ? "\\t" : NULL;
        if (esc) {
            puts_(b, esc);
        } else if (c >= ' ' && c <= '~') {
            putch(b, c);
        } else if (c >= 0x10000) {
            put_u_escape(b, "\\u", 0xD800 | (c - 0x10000) >> 10, 4);
            put_u_escape(b, "\\u", 0xDC00 | (c & 0x3FF), 4);
        } else {
            put_u_escape(b, "\\u", c, 4);
        }
    }
    putch(b, '"');
}

/* What Python's str.isprintable() calls unprintable above ASCII: controls, format characters,
   separators, surrogates, private use and non-characters (unassigned code points aside). */
static int unprintable(unsigned c)
{
    static const unsigned ranges[][2] = {
        {0x80, 0xA0}, {0xAD, 0xAD}, {0x600, 0x605}, {0x61C, 0x61C}, {0x6DD, 0x6DD}, {0x70F, 0x70F},
        {0x890, 0x891}, {0x8E2, 0x8E2}, {0x180E, 0x180E}, {0x1680, 0x1680}, {0x2000, 0x200F},
        {0x2028, 0x202F}, {0x205F, 0x2064}, {0x2066, 0x206F}, {0x3000, 0x3000}, {0xD800, 0xF8FF},
        {0xFDD0, 0xFDEF}, {0xFEFF, 0xFEFF}, {0xFFF9, 0xFFFB}, {0x110BD, 0x110BD}, {0x110CD, 0x110CD},
        {0x13430, 0x13438}, {0x1BCA0, 0x1BCA3}, {0x1D173, 0x1D17A}, {0xE0001, 0xE0001},
        {0xE0020, 0xE007F}, {0xF0000, 0x10FFFF}};
    if ((c & 0xFFFE) == 0xFFFE)
        return 1;
    for (size_t i = 0; i < COUNT(ranges); i++)
        if (c >= ranges[i][0] && c <= ranges[i][1])
            return 1;
    return 0;
}

/* Python's repr() of a string. */
static void put_repr(Buf *b, const char *s, size_t n)
{
    char quote = memchr(s, '\'', n) && !memchr(s, '"', n) ? '"' : '\'';
    putch(b, quote);
    for (size_t i = 0; i < n;) {
        unsigned c = next_cp(s, &i);
        if (c == (unsigned char)quote || c == '\\')
            putch(b, '\\'), putch(b, c);
        else if (c == '\t' || c == '\n' || c == '\r')
            puts_(b, c == '\t' ? "\\t" : c == '\n' ? "\\n" : "\\r");
        else if (c < ' ' || c == 0x7F || (c > 0x7F && c <= 0xFF && unprintable(c)))
            put_u_escape(b, "\\x", c, 2);
        else if (c > 0xFF && unprintable(c))
            c <= 0xFFFF ? put_u_escape(b, "\\u", c, 4) : put_u_escape(b, "\\U", c, 8);
        else
            put_cp(b, c);
    }
    putch(b, quote);
}

/* Python's str.isspace(), for str.strip(). */
static int space(unsigned c)
{
    return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680
        || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F
        || c == 0x3000;
}

/* ---------------------------------------------------------------- answers */

static const char *version = LATEST; /* the request's cniVersion, once it is known */

static void write_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return; /* nobody reads our stdout any more: the exit status still tells */
        p += w, n -= (size_t)w;
    }
}

/* Writes the output (lone surrogates as '?', a newline at the end) and exits. */
static _Noreturn void finish(int status, const char *s, size_t n)
{
    if (n) {
        Buf out = {0};
        for (size_t i = 0; i < n;) {
            size_t at = i;
            if (surrogate(next_cp(s, &i)))
                putch(&out, '?');
            else
                put(&out, s + at, i - at);
        }
        if (s[n - 1] != '\n')
            putch(&out, '\n');
        write_all(1, out.p, out.n);
    }
    _exit(status);
}

/* code: the JSON number as text (the agent's codes are echoed as it wrote them). */
static _Noreturn void fail_text(const char *code, const char *msg, size_t len, const char *details)
{
    Buf doc = {0};
    puts_(&doc, "{\"cniVersion\": ");
    put_json_string(&doc, version, strlen(version));
    putf(&doc, ", \"code\": %s, \"msg\": ", code);
    put_json_string(&doc, msg, len);
    puts_(&doc, ", \"details\": ");
    put_json_string(&doc, details, strlen(details));
    putch(&doc, '}');
    finish(1, doc.p, doc.n);
}

static _Noreturn void fail(int code, const char *details, const char *fmt, ...)
{
    Buf msg = {0};
    char num[16];
    va_list ap;
    va_start(ap, fmt);
    vputf(&msg, fmt, ap);
    va_end(ap);
    snprintf(num, sizeof num, "%d", code);
    fail_text(num, msg.p, msg.n, details);
}

static _Noreturn void fail_memory(void)
{
    static const char doc[] = "{\"cniVersion\": \"" LATEST "\", \"code\": 999, \"msg\": "
                              "\"podnet-cni failed unexpectedly: out of memory\", \"details\": \"\"}\n";
    write_all(1, doc, sizeof doc - 1);
    _exit(1);
}

/* ---------------------------------------------------------------- JSON, as json.loads reads it */

enum { J_OK, J_SYNTAX, J_DEEP, J_CONSTANT, J_BIGINT };
#define FAILED ((size_t)-1)

typedef struct {
    char type;      /* 'o'bject 'a'rray 's'tring 'i'nt 'f'loat 'b'ool 'n'ull; 0: absent */
    size_t at, end; /* its text */
} Value;

typedef struct {
    const char *s;
    size_t n;
    int max_depth;
    const char *const *names; /* members of the top-level object to keep */
    Value *found;             /* their values: the last of each name, as a dict keeps it */
    size_t nnames;
    int err;
    const char *what; /* J_SYNTAX: the message; J_CONSTANT: the constant */
    size_t pos;       /* J_SYNTAX: byte offset; J_BIGINT: digits */
} Json;

static size_t syntax(Json *j, const char *what, size_t pos)
{
    j->err = J_SYNTAX, j->what = what, j->pos = pos;
    return FAILED;
}

static size_t skip_ws(const Json *j, size_t i)
{
    while (i < j->n && (j->s[i] == ' ' || j->s[i] == '\t' || j->s[i] == '\n' || j->s[i] == '\r'))
        i++;
    return i;
}

static int digit(char c) { return c >= '0' && c <= '9'; }

static int hex4(const char *s, unsigned *out)
{
    unsigned v = 0;
    for (int k = 0; k < 4; k++) {
        char c = s[k];
        int d = digit(c) ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0)
            return 0;
        v = v << 4 | (unsigned)d;
    }
    *out = v;
    return 1;
}

/* A string from the character after its opening quote (end); returns the offset after the
   closing quote. Decodes into out unless it is NULL. The offsets and their checks follow
   CPython's scanstring_unicode, so errors are found where, and as, Python finds them. */
static size_t string(Json *j, size_t end, Buf *out)
{
    const char *s = j->s;
    size_t len = j->n, begin = end - 1, next;
    for (;;) {
        char c = 0;
        for (next = end; next < len; next++) {
            c = s[next];
            if (c == '"' || c == '\\')
                break;
            if ((unsigned char)c <= 0x1F)
                return syntax(j, "Invalid control character at", next);
        }
        if (next == len)
            return syntax(j, "Unterminated string starting at", begin);
        if (out)
            put(out, s + end, next - end);
        if (c == '"')
            return next + 1;
        if (++next == len)
            return syntax(j, "Unterminated string starting at", begin);
        unsigned cp;
        c = s[next];
        if (c != 'u') {
            end = next + 1;
            const char *from = "\"\\/bfnrt", *to = "\"\\/\b\f\n\r\t", *at = c ? strchr(from, c) : NULL;
            if (!at)
                return syntax(j, "Invalid \\escape", end - 2);
            cp = (unsigned char)to[at - from];
        } else {
            next++;
            end = next + 4;
            if (end >= len)
                return syntax(j, "Invalid \\uXXXX escape", next - 1);
            if (!hex4(s + next, &cp))
                return syntax(j, "Invalid \\uXXXX escape", end - 5);
            next = end;
            /* A high surrogate followed by an escaped low one is one character; else it stays alone. */
            if (cp >= 0xD800 && cp <= 0xDBFF && end + 6 < len && s[next] == '\\' && s[next + 1] == 'u') {
                unsigned low;
                end += 6;
                if (!hex4(s + next + 2, &low))
                    return syntax(j, "Invalid \\uXXXX escape", end - 5);
                if (low >= 0xDC00 && low <= 0xDFFF)
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                else
                    end -= 6;
            }
        }
        if (out)
            put_cp(out, cp);
    }
}

static size_t number(Json *j, size_t start, Value *v)
{
    const char *s = j->s;
    size_t idx = start, last = j->n - 1;
    int is_float = 0;
    if (s[idx] == '-' && ++idx > last)
        return syntax(j, "Expecting value", start);
    if (s[idx] >= '1' && s[idx] <= '9') {
        for (idx++; idx <= last && digit(s[idx]); idx++)
            ;
    } else if (s[idx] == '0') {
        idx++;
    } else {
        return syntax(j, "Expecting value", start);
    }
    if (idx < last && s[idx] == '.' && digit(s[idx + 1])) {
        is_float = 1;
        for (idx += 2; idx <= last && digit(s[idx]); idx++)
            ;
    }
    if (idx < last && (s[idx] == 'e' || s[idx] == 'E')) {
        size_t e_start = idx++;
        if (idx < last && (s[idx] == '-' || s[idx] == '+'))
            idx++;
        while (idx <= last && digit(s[idx]))
            idx++;
        if (digit(s[idx - 1]))
            is_float = 1;
        else
            idx = e_start; /* "1e" or "1e+": the number is 1, and what follows is not JSON */
    }
    if (!is_float && idx - start - (s[start] == '-') > MAX_INT_DIGITS) {
        j->err = J_BIGINT, j->pos = idx - start - (s[start] == '-');
        return FAILED;
    }
    v->type = is_float ? 'f' : 'i';
    return v->end = idx;
}

static size_t value(Json *j, size_t idx, int depth, Value *v);

static size_t object(Json *j, size_t idx, int depth)
{
    const char *s = j->s;
    Buf key = {0};
    int keep = depth == 1 && j->nnames;
    idx = skip_ws(j, idx);
    if (idx < j->n && s[idx] == '}')
        return idx + 1;
    for (;;) {
        if (idx >= j->n || s[idx] != '"')
            return syntax(j, "Expecting property name enclosed in double quotes", idx);
        key.n = 0;
        size_t next = string(j, idx + 1, keep ? &key : NULL);
        if (next == FAILED)
            return FAILED;
        idx = skip_ws(j, next);
        if (idx >= j->n || s[idx] != ':')
            return syntax(j, "Expecting ':' delimiter", idx);
        idx = skip_ws(j, idx + 1);
        Value item = {0};
        if ((next = value(j, idx, depth, &item)) == FAILED)
            return FAILED;
        for (size_t k = 0; keep && k < j->nnames; k++)
            if (strlen(j->names[k]) == key.n && memcmp(j->names[k], key.p, key.n) == 0)
                j->found[k] = item;
        idx = skip_ws(j, next);
        if (idx < j->n && s[idx] == '}')
            return idx + 1;
        if (idx >= j->n || s[idx] != ',')
            return syntax(j, "Expecting ',' delimiter", idx);
        idx = skip_ws(j, idx + 1);
    }
}

static size_t array(Json *j, size_t idx, int depth)
{
    idx = skip_ws(j, idx);
    if (idx < j->n && j->s[idx] == ']')
        return idx + 1;
    for (;;) {
        Value item = {0};
        size_t next = value(j, idx, depth, &item);
        if (next == FAILED)
            return FAILED;
        idx = skip_ws(j, next);
        if (idx < j->n && j->s[idx] == ']')
            return idx + 1;
        if (idx >= j->n || j->s[idx] != ',')
            return syntax(j, "Expecting ',' delimiter", idx);
        idx = skip_ws(j, idx + 1);
    }
}

static int word(const Json *j, size_t idx, const char *w)
{
    size_t n = strlen(w);
    return idx + n <= j->n && memcmp(j->s + idx, w, n) == 0;
}

static size_t value(Json *j, size_t idx, int depth, Value *v)
{
    static const char *const constants[] = {"NaN", "Infinity", "-Infinity"};
    if (idx >= j->n)
        return syntax(j, "Expecting value", idx);
    v->at = idx;
    switch (j->s[idx]) {
    case '"':
        v->type = 's';
        return v->end = string(j, idx + 1, NULL);
    case '{':
    case '[':
        if (depth >= j->max_depth) {
            j->err = J_DEEP;
            return FAILED;
        }
        v->type = j->s[idx] == '{' ? 'o' : 'a';
        return v->end = (v->type == 'o' ? object : array)(j, idx + 1, depth + 1);
    case 'n':
    case 't':
    case 'f':
        for (const char *const *w = (const char *const[]){"null", "true", "false", NULL}; *w; w++)
            if (word(j, idx, *w)) {
                v->type = **w == 'n' ? 'n' : 'b';
                return v->end = idx + strlen(*w);
            }
        break;
    case 'N':
    case 'I':
    case '-':
        for (size_t k = 0; k < COUNT(constants); k++)
            if (word(j, idx, constants[k])) { /* json.loads as the plugin called it refuses them */
                j->err = J_CONSTANT, j->what = constants[k];
                return FAILED;
            }
        break;
    }
    return number(j, idx, v);
}

/* json.loads(text); 0, or -1 with the error in j. */
static int parse(Json *j, Value *top)
{
    size_t end = value(j, skip_ws(j, 0), 0, top);
    if (end == FAILED)
        return -1;
    end = skip_ws(j, end);
    if (end < j->n) {
        syntax(j, "Extra data", end);
        return -1;
    }
    return 0;
}

/* The message of the ValueError json.loads raised (not for J_DEEP, a RecursionError there). */
static void json_error(const Json *j, Buf *b)
{
    if (j->err == J_CONSTANT) {
        putf(b, "%s is not valid JSON", j->what);
    } else if (j->err == J_BIGINT) {
        putf(b, "Exceeds the limit (%d digits) for integer string conversion: value has %zu digits; "
                "use sys.set_int_max_str_digits() to increase the limit", MAX_INT_DIGITS, j->pos);
    } else { /* positions count characters, as Python's do */
        long chars = 0, line = 1, newline = -1;
        for (size_t i = 0; i < j->pos; i++) {
            if ((j->s[i] & 0xC0) != 0x80)
                chars++;
            if (j->s[i] == '\n')
                line++, newline = chars - 1;
        }
        putf(b, "%s: line %ld column %ld (char %ld)", j->what, line, chars - newline, chars);
    }
}

/* A string value's decoded text, NUL-terminated (it may hold NULs). */
static Buf text_of(Json *j, Value v)
{
    Buf b = {0};
    put(&b, "", 0);
    string(j, v.at + 1, &b);
    return b;
}

/* ---------------------------------------------------------------- the agent */

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

/* 1 when fd is ready for events within `seconds`, 0 when the time ran out. */
static int wait_fd(int fd, short events, double seconds)
{
    double deadline = now() + seconds;
    for (;;) {
        double left = deadline - now();
        if (left < 0)
            return 0;
        struct pollfd p = {.fd = fd, .events = events};
        int r = poll(&p, 1, (int)(left * 1000 + 0.999));
        if (r >= 0)
            return r > 0;
        if (errno != EINTR)
            return 1; /* the call that follows reports the error */
    }
}

static _Noreturn void unreachable(const char *path, const char *fmt, ...)
{
    Buf reason = {0};
    va_list ap;
    va_start(ap, fmt);
    vputf(&reason, fmt, ap);
    va_end(ap);
    fail(11, AGENT_DOWN, "podnet agent not reachable at %s: %s", path, reason.p);
}

/* The agent's answer to request; path: as shown, addr: as connected to. */
static Buf ask_agent(const char *path, const char *addr, size_t addr_len, double timeout, const Buf *request)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        fail(999, "", "podnet-cni failed unexpectedly: OSError: [Errno %d] %s", errno, strerror(errno));
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    memcpy(sa.sun_path, addr, addr_len);
    /* Not blocking: a unix socket connects at once or fails (with EAGAIN when the agent's
       backlog is full, "Resource temporarily unavailable"), so there is no connect timeout. */
    if (connect(fd, (struct sockaddr *)&sa, offsetof(struct sockaddr_un, sun_path) + addr_len) < 0)
        unreachable(path, "%s", strerror(errno));

    double deadline = now() + timeout;
    size_t sent = 0;
    while (sent < request->n) {
        if (!wait_fd(fd, POLLOUT, deadline - now()))
            unreachable(path, "request not taken within %g s", timeout);
        ssize_t w = send(fd, request->p + sent, request->n - sent, MSG_NOSIGNAL);
        if (w >= 0)
            sent += (size_t)w;
        else if (errno != EINTR && errno != EAGAIN)
            break; /* the agent may have answered early (a refused request) and closed: read its answer */
    }
    if (sent == request->n)
        shutdown(fd, SHUT_WR);

    Buf reply = {0};
    put(&reply, "", 0);
    for (;;) {
        char chunk[1 << 16];
        if (!wait_fd(fd, POLLIN, timeout))
            unreachable(path, "no answer within %g s", timeout);
        ssize_t r = recv(fd, chunk, sizeof chunk, 0);
        if (r < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (r < 0)
            unreachable(path, "connection lost: %s", strerror(errno));
        if (r == 0)
            break;
        if (reply.n + (size_t)r > MAX_REPLY)
            fail(999, "", "podnet agent at %s sent an answer larger than %d bytes", path, MAX_REPLY);
        put(&reply, chunk, (size_t)r);
    }
    close(fd);
    return reply;
}

/* Whether the agent's output is a CNI error document: a JSON object with an integer code. */
static int is_error_document(const Buf *output)
{
    static const char *const names[] = {"code"};
    Value found[1] = {{0}}, top = {0};
    /* One frame deeper than the other reads in the Python plugin: one level less of nesting. */
    Json j = {.s = output->p, .n = output->n, .max_depth = MAX_DEPTH - 1, .names = names, .found = found, .nnames = 1};
    return parse(&j, &top) == 0 && top.type == 'o' && found[0].type == 'i';
}

/* str.strip(): the offsets of text without the whitespace at either end. */
static void strip(const Buf *text, size_t *from, size_t *to)
{
    size_t i;
    *from = 0, *to = text->n;
    while (*from < *to && (i = *from, space(next_cp(text->p, &i))))
        *from = i;
    while (*to > *from) {
        size_t at = *to - 1;
        while ((text->p[at] & 0xC0) == 0x80)
            at--;
        if (i = at, !space(next_cp(text->p, &i)))
            break;
        *to = at;
    }
}

static _Noreturn void answer(const char *path, const Buf *data)
{
    static const char *const names[] = {"code", "output"};
    Value found[2] = {{0}}, top = {0};
    const char *why;
    if (!data->n)
        unreachable(path, "the agent closed the connection without answering");
    Json j = {.s = data->p, .n = data->n, .max_depth = MAX_DEPTH, .names = names, .found = found, .nnames = 2};
    if (utf8_check(data->p, data->n, &why) != data->n || parse(&j, &top) || top.type != 'o'
        || found[0].type != 'i' || found[1].type != 's')
        fail(999, "", "podnet agent at %s sent a malformed answer", path);
    Buf code = {0}, output = text_of(&j, found[1]);
    put(&code, data->p + found[0].at, found[0].end - found[0].at);
    if (strcmp(code.p, "-0") == 0)
        code.p[0] = '0', code.p[1] = 0;
    int ok = strcmp(code.p, "0") == 0;
    if (!ok && !is_error_document(&output)) {
        /* Whatever the agent said, stdout on failure must be a CNI error document. */
        size_t from, to;
        Buf msg = {0};
        strip(&output, &from, &to);
        if (from < to)
            put(&msg, output.p + from, to - from);
        else
            putf(&msg, "podnet agent failed with code %s", code.p);
        fail_text(code.p, msg.p, msg.n, "");
    }
    finish(ok ? 0 : 1, output.p, output.n);
}

/* ---------------------------------------------------------------- the request */

extern char **environ;

/* {"env": {CNI_* variables, the first of each name}, "stdin": text}, as json.dumps wrote it;
   for podnet-ipam also "plugin": "podnet-ipam". */
static Buf request(const char *text, size_t len, int ipam)
{
    Buf req = {0};
    int first = 1;
    puts_(&req, "{\"env\": {");
    for (char **e = environ; *e; e++) {
        const char *eq = strchr(*e, '=');
        size_t klen = eq ? (size_t)(eq - *e) : 0;
        if (klen < 4 || memcmp(*e, "CNI_", 4) != 0)
            continue;
        int seen = 0;
        for (char **o = environ; o < e && !seen; o++)
            seen = strncmp(*o, *e, klen + 1) == 0;
        if (seen)
            continue;
        Buf k = {0}, v = {0};
        put_escaped_bytes(&k, *e, klen);
        put_escaped_bytes(&v, eq + 1, strlen(eq + 1));
        puts_(&req, first ? "" : ", ");
        put_json_string(&req, k.p, k.n);
        puts_(&req, ": ");
        put_json_string(&req, v.p, v.n);
        free(k.p), free(v.p);
        first = 0;
    }
    puts_(&req, "}, \"stdin\": ");
    put_json_string(&req, text, len);
    if (ipam)
        puts_(&req, ", \"plugin\": \"" IPAM_NAME "\"");
    putch(&req, '}');
    return req;
}

static Buf read_stdin(void)
{
    Buf in = {0};
    put(&in, "", 0);
    for (;;) {
        char chunk[1 << 16];
        ssize_t r = read(0, chunk, sizeof chunk);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            fail(5, "", "error reading the network configuration from stdin: %s", strerror(errno));
        if (r == 0)
            return in;
        put(&in, chunk, (size_t)r);
    }
}

/* The cniVersion a VERSION request names, if this plugin speaks it. */
static const char *requested_version(const Buf *raw)
{
    static const char *const names[] = {"cniVersion"};
    Value found[1] = {{0}}, top = {0};
    const char *why;
    Json j = {.s = raw->p, .n = raw->n, .max_depth = MAX_DEPTH, .names = names, .found = found, .nnames = 1};
    if (utf8_check(raw->p, raw->n, &why) != raw->n || parse(&j, &top) || top.type != 'o' || found[0].type != 's')
        return LATEST;
    Buf v = text_of(&j, found[0]);
    const char *known = member(SUPPORTED, COUNT(SUPPORTED), v.p, v.n);
    return known ? known : LATEST;
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    /* basename() may change its argument: a copy. */
    const int ipam = argc > 0 && strcmp(basename(strdupa(argv[0])), IPAM_NAME) == 0;
    const char *command = getenv("CNI_COMMAND");
    if (!command || !*command)
        fail(4, EXPECTED_COMMAND, "required environment variable CNI_COMMAND is missing");
    if (!member(COMMANDS, COUNT(COMMANDS), command, strlen(command))) {
        Buf text = {0}, msg = {0};
        put_escaped_bytes(&text, command, strlen(command));
        puts_(&msg, "unknown CNI_COMMAND ");
        put_repr(&msg, text.p, text.n);
        fail_text("4", msg.p, msg.n, EXPECTED_COMMAND);
    }
    Buf raw = read_stdin();
    if (strcmp(command, "VERSION") == 0) {
        Buf out = {0};
        putf(&out, "{\"cniVersion\": \"%s\", \"supportedVersions\": [", requested_version(&raw));
        for (size_t i = 0; i < COUNT(SUPPORTED); i++)
            putf(&out, "%s\"%s\"", i ? ", " : "", SUPPORTED[i]);
        puts_(&out, "]}");
        finish(0, out.p, out.n);
    }

    const char *why = NULL;
    size_t bad = utf8_check(raw.p, raw.n, &why);
    if (bad != raw.n)
        fail(6, "", "error decoding the network configuration: stdin is not UTF-8 text (%s at byte %zu)", why, bad);
    static const char *const names[] = {"cniVersion", "agentSocket", "agentTimeout", "ipam"};
    Value found[4] = {{0}}, top = {0};
    Json j = {.s = raw.p, .n = raw.n, .max_depth = MAX_DEPTH, .names = names, .found = found, .nnames = 4};
    if (parse(&j, &top)) {
        Buf msg = {0};
        puts_(&msg, "error decoding the network configuration: ");
        if (j.err == J_DEEP)
            puts_(&msg, "JSON nested too deeply");
        else
            json_error(&j, &msg);
        fail_text("6", msg.p, msg.n, "");
    }
    if (top.type != 'o') {
        const char *got = top.type == 'a' ? "list" : top.type == 's' ? "str" : top.type == 'i' ? "int"
                        : top.type == 'f' ? "float" : top.type == 'b' ? "bool" : "null";
        fail(6, "", "error decoding the network configuration: expected a JSON object, got %s", got);
    }
    if (found[0].type == 's') {
        Buf v = text_of(&j, found[0]);
        const char *known = member(SUPPORTED, COUNT(SUPPORTED), v.p, v.n);
        version = known ? known : version;
    }
    /* Where agentSocket and agentTimeout are: the top level for podnet-cni, the ipam object
       for podnet-ipam (a main plugin hands its IPAM the whole configuration). */
    Json *conf = &j;
    Value *socket_v = &found[1], *timeout_v = &found[2];
    const char *field_socket = "agentSocket", *field_timeout = "agentTimeout";
    static const char *const ipam_names[] = {"agentSocket", "agentTimeout"};
    Value ipam_found[2] = {{0}}, ipam_top = {0};
    Json ipam_j = {.max_depth = MAX_DEPTH, .names = ipam_names, .found = ipam_found, .nnames = 2};
    if (ipam) {
        socket_v = &ipam_found[0], timeout_v = &ipam_found[1];
        field_socket = "ipam.agentSocket", field_timeout = "ipam.agentTimeout";
        if (found[3].type == 'o') { /* otherwise the defaults, and the agent says what is wrong with ipam */
            ipam_j.s = raw.p + found[3].at, ipam_j.n = found[3].end - found[3].at;
            parse(&ipam_j, &ipam_top); /* parsed once already, as part of the whole */
            conf = &ipam_j;
        }
    }

    /* agentSocket: the path as text (for messages) and as bytes (to connect to). */
    Buf path = {0}, addr = {0};
    if (!socket_v->type) {
        puts_(&path, DEFAULT_SOCKET);
    } else {
        if (socket_v->type == 's')
            path = text_of(conf, *socket_v);
        int valid = path.n && !memchr(path.p, 0, path.n);
        for (size_t i = 0; valid && i < path.n;) {
            size_t at = i;
            unsigned c = next_cp(path.p, &i);
            if (c >= 0xDC80 && c <= 0xDCFF)
                putch(&addr, (char)(c - 0xDC00)); /* an escaped byte: connect to the byte itself */
            else if (surrogate(c))
                valid = 0; /* no bytes name it */
            else
                put(&addr, path.p + at, i - at);
        }
        if (!valid)
            fail(7, "", "invalid network configuration field %s: expected a non-empty socket path", field_socket);
    }
    if (!addr.n)
        put(&addr, path.p, path.n);
    if (addr.n > SUN_PATH_MAX) {
        Buf msg = {0};
        putf(&msg, "invalid network configuration field %s: ", field_socket);
        put_repr(&msg, path.p, path.n);
        putf(&msg, " is longer than %d bytes, the limit for a unix socket path", SUN_PATH_MAX);
        fail_text("7", msg.p, msg.n, "");
    }
    double timeout = DEFAULT_REPLY_TIMEOUT;
    if (timeout_v->type) {
        Buf num = {0};
        put(&num, conf->s + timeout_v->at, timeout_v->end - timeout_v->at);
        if (timeout_v->type == 'i' || timeout_v->type == 'f')
            timeout = strtod(num.p, NULL);
        if (!(timeout_v->type == 'i' || timeout_v->type == 'f') || !(timeout > 0 && timeout <= 3600))
            fail(7, "", "invalid network configuration field %s: expected seconds, "
                        "a number above 0 and at most 3600", field_timeout);
    }

    Buf req = request(raw.p, raw.n, ipam);
    Buf reply = ask_agent(path.p, addr.p, addr.n, timeout, &req);
    answer(path.p, &reply);
}
