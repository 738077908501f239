/* Checks the reduction kernels (csrc/reduce.c) against a straightforward reference: every
 * dtype x op over odd counts and misaligned starts, NaN/Inf, float16/bfloat16 rounding, integer
 * wrap-around, truncating division, and the name/size/support tables. Where the CPU converts
 * float16 in hardware, everything runs twice: once on that path, once on the portable one. */
#include "reduce.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static long checks, failures;

#define CHECK(cond, ...)                                                                           \
  do {                                                                                             \
    checks++;                                                                                      \
    if (!(cond)) {                                                                                 \
      if (++failures <= 30) {                                                                      \
        printf("FAIL %s:%d: ", __FILE__, __LINE__);                                                \
        printf(__VA_ARGS__);                                                                       \
        printf("\n");                                                                              \
      }                                                                                            \
    }                                                                                              \
  } while (0)

static const size_t counts[] = {0, 1, 7, 255, 256, 257, 1000};
#define NCOUNTS (sizeof counts / sizeof counts[0])
#define GUARD 16 /* bytes after the last element that must stay untouched */

static uint64_t rng_state = 0x9e3779b97f4a7c15u;

static uint64_t rng(void) { /* xorshift64* */
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return rng_state * 0x2545f4914f6cdd1du;
}

static int is_float(mc_dtype_t d) {
  return d == MC_FLOAT32 || d == MC_FLOAT64 || d == MC_FLOAT16 || d == MC_BFLOAT16;
}

/* ---- Reference 16-bit float formats, written from the definitions ---- */

typedef struct {
  int mantissa_bits, exponent_bias;
  uint16_t max_finite; /* max_finite + 1 is +inf */
  uint16_t quiet_nan;
} half_format;

static const half_format fp16 = {10, 15, 0x7bff, 0x7e00};
static const half_format bf16 = {7, 127, 0x7f7f, 0x7fc0};

static double half_value(const half_format *f, uint16_t h) {
  int exponent_max = (1 << (15 - f->mantissa_bits)) - 1;
  int exponent = (h & 0x7fff) >> f->mantissa_bits;
  int mantissa = h & ((1 << f->mantissa_bits) - 1);
  double magnitude;
  if (exponent == exponent_max)
    magnitude = mantissa ? NAN : INFINITY;
  else if (exponent == 0)
    magnitude = ldexp(mantissa, 1 - f->exponent_bias - f->mantissa_bits);
  else
    magnitude =
        ldexp(mantissa + (1 << f->mantissa_bits), exponent - f->exponent_bias - f->mantissa_bits);
  return (h & 0x8000) ? -magnitude : magnitude;
}

/* Round to the nearest representable value, ties to the even bit pattern, by searching the
 * (monotonic) positive patterns. Past max_finite the next step would be one more ulp, so the
 * rounding midpoint there decides overflow to inf. */
static uint16_t half_round(const half_format *f, double v) {
  if (isnan(v))
    return f->quiet_nan;
  uint16_t sign = signbit(v) ? 0x8000 : 0;
  double a = fabs(v);
  uint16_t inf = (uint16_t)(f->max_finite + 1);
  if (isinf(a))
    return sign | inf;
  uint16_t lo = 0, hi = f->max_finite; /* largest pattern with value <= a */
  while (lo < hi) {
    uint16_t mid = (uint16_t)((lo + hi + 1) / 2);
    if (half_value(f, mid) <= a)
      lo = mid;
    else
      hi = (uint16_t)(mid - 1);
  }
  double below = half_value(f, lo);
  double above = lo == f->max_finite ? 2 * below - half_value(f, (uint16_t)(lo - 1))
                                     : half_value(f, (uint16_t)(lo + 1));
  double midpoint = (below + above) / 2;
  uint16_t r = (a < midpoint || (a == midpoint && (lo & 1) == 0)) ? lo : (uint16_t)(lo + 1);
  return sign | r;
}

static const half_format *half_fmt(mc_dtype_t d) { return d == MC_FLOAT16 ? &fp16 : &bf16; }

/* ---- Element access ---- */

static double get_float(mc_dtype_t d, const void *buf, size_t i) {
  if (d == MC_FLOAT32) {
    float v;
    memcpy(&v, (const char *)buf + 4 * i, 4);
    return v;
  }
  if (d == MC_FLOAT64) {
    double v;
    memcpy(&v, (const char *)buf + 8 * i, 8);
    return v;
  }
  uint16_t h;
  memcpy(&h, (const char *)buf + 2 * i, 2);
  return half_value(half_fmt(d), h);
}

/* Stores v rounded to the dtype (float32 arithmetic results are exact floats already). */
static void put_float(mc_dtype_t d, void *buf, size_t i, double v) {
  if (d == MC_FLOAT32) {
    float f = (float)v;
    memcpy((char *)buf + 4 * i, &f, 4);
  } else if (d == MC_FLOAT64) {
    memcpy((char *)buf + 8 * i, &v, 8);
  } else {
    uint16_t h = half_round(half_fmt(d), v);
    memcpy((char *)buf + 2 * i, &h, 2);
  }
}

static int64_t get_int(mc_dtype_t d, const void *buf, size_t i) {
  const char *p = (const char *)buf + i * mc_dtype_size(d);
  switch (d) {
  case MC_INT8: return *(const int8_t *)p;
  case MC_INT16: {
    int16_t v;
    memcpy(&v, p, 2);
    return v;
  }
  case MC_INT32: {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
  }
  case MC_INT64: {
    int64_t v;
    memcpy(&v, p, 8);
    return v;
  }
  default: return *(const uint8_t *)p; /* uint8, bool */
  }
}

static void put_int(mc_dtype_t d, void *buf, size_t i, int64_t v) {
  char *p = (char *)buf + i * mc_dtype_size(d);
  switch (d) {
  case MC_INT8: {
    int8_t x = (int8_t)v;
    memcpy(p, &x, 1);
    break;
  }
  case MC_INT16: {
    int16_t x = (int16_t)v;
    memcpy(p, &x, 2);
    break;
  }
  case MC_INT32: {
    int32_t x = (int32_t)v;
    memcpy(p, &x, 4);
    break;
  }
  case MC_INT64: memcpy(p, &v, 8); break;
  default: {
    uint8_t x = (uint8_t)v;
    memcpy(p, &x, 1);
    break;
  }
  }
}

/* Two's complement wrap of v to the dtype's width. */
static int64_t wrap_int(mc_dtype_t d, uint64_t v) {
  int bits = (int)(8 * mc_dtype_size(d));
  if (bits == 64)
    return v >= (1ull << 63) ? -(int64_t)(~v) - 1 : (int64_t)v;
  v &= (1ull << bits) - 1;
  if (d == MC_UINT8)
    return (int64_t)v;
  return v >= (1ull << (bits - 1)) ? (int64_t)v - (1ll << bits) : (int64_t)v;
}

static uint64_t raw_bits(mc_dtype_t d, const void *buf, size_t i) {
  uint64_t v = 0;
  memcpy(&v, (const char *)buf + i * mc_dtype_size(d), mc_dtype_size(d));
  return v;
}

/* ---- Random data ---- */

static double random_float(int exponent_range) {
  switch (rng() % 16) {
  case 0: return NAN;
  case 1: return INFINITY;
  case 2: return -INFINITY;
  case 3: return (rng() & 1) ? 0.0 : -0.0;
  case 4: return ldexp((double)(rng() % 1000 + 1), -1074 + (int)(rng() % 8)); /* subnormal */
  default: {
    double m = (double)(rng() >> 11) / 9007199254740992.0 + 0.5;
    double v = ldexp(m, (int)(rng() % (2 * exponent_range + 1)) - exponent_range);
    return (rng() & 1) ? -v : v;
  }
  }
}

static void fill_random(mc_dtype_t d, void *buf, size_t n) {
  for (size_t i = 0; i < n; i++) {
    uint64_t r = rng();
    switch (d) {
    case MC_FLOAT32: {
      float f = (float)random_float(20);
      if (rng() % 16 == 0) /* float32 subnormals and extremes */
        f = (rng() & 1) ? 1e-40f * (float)(rng() % 100) : 3.4e38f;
      memcpy((char *)buf + 4 * i, &f, 4);
      break;
    }
    case MC_FLOAT64: {
      double v = random_float(40);
      if (rng() % 16 == 0)
        v = (rng() & 1) ? 1.7e308 : -1.7e308;
      memcpy((char *)buf + 8 * i, &v, 8);
      break;
    }
    case MC_FLOAT16:
    case MC_BFLOAT16: {
      /* Half the time any bit pattern (NaN, inf, subnormals), half the time values near 1 so
       * that sums and products need rounding. */
      uint16_t h = (uint16_t)r;
      if (r & (1ull << 32)) {
        const half_format *f = half_fmt(d);
        int exponent = f->exponent_bias - 3 + (int)((r >> 40) % 7);
        h = (uint16_t)((h & 0x8000) | (exponent << f->mantissa_bits) |
                       (h & ((1 << f->mantissa_bits) - 1)));
      }
      memcpy((char *)buf + 2 * i, &h, 2);
      break;
    }
    case MC_BOOL: put_int(d, buf, i, (int64_t)(r & 1)); break;
    default: {
      /* Mostly arbitrary bits, sometimes small values so products do not just wrap to 0. */
      uint64_t bits = (r % 4 == 0) ? (uint64_t)(int64_t)((int)(rng() % 21) - 10) : rng();
      if (r % 8 == 1)
        bits = (r & 16) ? 1ull << (8 * mc_dtype_size(d) - 1)
                        : (1ull << (8 * mc_dtype_size(d) - 1)) - 1;
      memcpy((char *)buf + i * mc_dtype_size(d), &bits, mc_dtype_size(d));
      break;
    }
    }
  }
}

/* ---- Reference reduction of one element ---- */

static void ref_reduce(mc_dtype_t d, mc_redop_t op, const void *a, const void *b, void *out,
                       size_t i) {
  if (d == MC_BOOL) {
    int x = get_int(d, a, i) != 0, y = get_int(d, b, i) != 0;
    int r = op == MC_BXOR                                                    ? x ^ y
            : (op == MC_SUM || op == MC_AVG || op == MC_MAX || op == MC_BOR) ? (x || y)
                                                                             : (x && y);
    put_int(d, out, i, r);
  } else if (is_float(d)) {
    double x = get_float(d, a, i), y = get_float(d, b, i), r;
    if (d != MC_FLOAT64) { /* float32 arithmetic, as the spec says for 16-bit types too */
      float fx = (float)x, fy = (float)y;
      r = op == MC_PRODUCT ? (double)(fx * fy) : (double)(fx + fy);
    } else {
      r = op == MC_PRODUCT ? x * y : x + y;
    }
    if (op == MC_MIN || op == MC_MAX)
      r = (isnan(x) || isnan(y)) ? NAN : (op == MC_MIN ? (x < y ? x : y) : (x > y ? x : y));
    put_float(d, out, i, r);
  } else {
    int64_t x = get_int(d, a, i), y = get_int(d, b, i), r;
    switch (op) {
    case MC_PRODUCT: r = wrap_int(d, (uint64_t)x * (uint64_t)y); break;
    case MC_MIN: r = x < y ? x : y; break;
    case MC_MAX: r = x > y ? x : y; break;
    case MC_BAND: r = x & y; break;
    case MC_BOR: r = wrap_int(d, (uint64_t)(x | y)); break;
    case MC_BXOR: r = wrap_int(d, (uint64_t)(x ^ y)); break;
    default: r = wrap_int(d, (uint64_t)x + (uint64_t)y); break;
    }
    put_int(d, out, i, r);
  }
}

/* Bitwise equality, except that any NaN matches any NaN and, for MIN/MAX, +0 matches -0. */
static int same_element(mc_dtype_t d, mc_redop_t op, const void *got, const void *want, size_t i) {
  if (raw_bits(d, got, i) == raw_bits(d, want, i))
    return 1;
  if (!is_float(d))
    return 0;
  double g = get_float(d, got, i), w = get_float(d, want, i);
  if (isnan(g) && isnan(w))
    return 1;
  return (op == MC_MIN || op == MC_MAX) && g == 0 && w == 0;
}

static void test_reduce_all(const char *path) {
  for (int di = 0; di < MC_DTYPE_COUNT; di++) {
    mc_dtype_t d = (mc_dtype_t)di;
    size_t size = mc_dtype_size(d);
    if (d == MC_COMPLEX64 || d == MC_COMPLEX128)
      continue; /* test_complex */
    for (int oi = 0; oi < MC_REDOP_COUNT; oi++) {
      mc_redop_t op = (mc_redop_t)oi;
      if (mc_reduce_supported(d, op) != MC_OK)
        continue;
      for (size_t c = 0; c < NCOUNTS; c++) {
        for (size_t offset = 0; offset < 2; offset++) { /* offset 1: misaligned start */
          size_t n = counts[c], bytes = (n + offset) * size + GUARD;
          unsigned char *dst = malloc(bytes), *src = malloc(bytes), *want = malloc(bytes),
                        *orig_dst = malloc(bytes), *orig_src = malloc(bytes);
          fill_random(d, dst, n + offset);
          fill_random(d, src, n + offset);
          memset(dst + (n + offset) * size, 0xa5, GUARD);
          memcpy(orig_dst, dst, bytes);
          memcpy(orig_src, src, bytes);
          memcpy(want, dst, bytes);
          unsigned char *x = dst + offset * size, *y = src + offset * size;
          unsigned char *x0 = orig_dst + offset * size, *w = want + offset * size;
          for (size_t i = 0; i < n; i++)
            ref_reduce(d, op, x0, y, w, i);
          mc_reduce_local(x, y, n, d, op);
          for (size_t i = 0; i < n; i++)
            CHECK(same_element(d, op, x, w, i),
                  "[%s] %s %s count=%zu offset=%zu i=%zu: a=%#llx b=%#llx got %#llx want %#llx",
                  path, mc_dtype_name(d), mc_redop_name(op), n, offset, i,
                  (unsigned long long)raw_bits(d, x0, i), (unsigned long long)raw_bits(d, y, i),
                  (unsigned long long)raw_bits(d, x, i), (unsigned long long)raw_bits(d, w, i));
          CHECK(memcmp(dst, orig_dst, offset * size) == 0 &&
                    memcmp(dst + (n + offset) * size, orig_dst + (n + offset) * size, GUARD) == 0,
                "[%s] %s %s count=%zu: wrote outside dst[0, count)", path, mc_dtype_name(d),
                mc_redop_name(op), n);
          CHECK(memcmp(src, orig_src, bytes) == 0, "[%s] %s %s count=%zu: src modified", path,
                mc_dtype_name(d), mc_redop_name(op), n);
          free(dst);
          free(src);
          free(want);
          free(orig_dst);
          free(orig_src);
        }
      }
    }
  }
}

/* ---- Hand-picked 16-bit rounding cases ---- */

typedef struct {
  mc_dtype_t dtype;
  mc_redop_t op;
  uint16_t a, b, want;
  const char *what;
} half_case;

static const half_case half_cases[] = {
    {MC_FLOAT16, MC_SUM, 0x3c00, 0x1000, 0x3c00, "1 + 2^-11: tie, rounds down to even"},
    {MC_FLOAT16, MC_SUM, 0x3c01, 0x1000, 0x3c02, "(1+2^-10) + 2^-11: tie, rounds up to even"},
    {MC_FLOAT16, MC_SUM, 0x3c00, 0x1001, 0x3c01, "just above the tie rounds up"},
    {MC_FLOAT16, MC_SUM, 0x7bff, 0x4c00, 0x7c00, "65504 + 16 = 65520 overflows to inf"},
    {MC_FLOAT16, MC_SUM, 0x7bff, 0x4800, 0x7bff, "65504 + 8 rounds back to 65504"},
    {MC_FLOAT16, MC_SUM, 0xfbff, 0xcc00, 0xfc00, "-65504 - 16 overflows to -inf"},
    {MC_FLOAT16, MC_PRODUCT, 0x5c00, 0x5c00, 0x7c00, "256 * 256 overflows to inf"},
    {MC_FLOAT16, MC_PRODUCT, 0x5bff, 0x5bff, 0x7bfe, "255.875^2 = 65472.02 rounds to 65472"},
    {MC_FLOAT16, MC_SUM, 0x0001, 0x0001, 0x0002, "subnormal + subnormal"},
    {MC_FLOAT16, MC_SUM, 0x03ff, 0x0001, 0x0400, "largest subnormal + 1 ulp = smallest normal"},
    {MC_FLOAT16, MC_PRODUCT, 0x0001, 0x3800, 0x0000, "2^-24 * 0.5: tie, rounds to zero (even)"},
    {MC_FLOAT16, MC_PRODUCT, 0x0003, 0x3800, 0x0002, "3*2^-24 * 0.5: tie, rounds to 2*2^-24"},
    {MC_FLOAT16, MC_PRODUCT, 0x0001, 0x3e00, 0x0002, "2^-24 * 1.5: tie, rounds up to even"},
    {MC_FLOAT16, MC_PRODUCT, 0x0400, 0x3800, 0x0200, "normal * 0.5 becomes subnormal"},
    {MC_FLOAT16, MC_PRODUCT, 0x8001, 0x3400, 0x8000, "-2^-24 * 0.25 underflows to -0"},
    {MC_FLOAT16, MC_SUM, 0x7c00, 0xfc00, 0x7e00, "inf + -inf is NaN"},
    {MC_FLOAT16, MC_SUM, 0x7c00, 0x3c00, 0x7c00, "inf + 1 = inf"},
    {MC_FLOAT16, MC_SUM, 0x7d00, 0x3c00, 0x7e00, "signalling NaN stays NaN"},
    {MC_FLOAT16, MC_MIN, 0x7e00, 0x3c00, 0x7e00, "min(NaN, 1) is NaN"},
    {MC_FLOAT16, MC_MIN, 0x3c00, 0x7e00, 0x7e00, "min(1, NaN) is NaN"},
    {MC_FLOAT16, MC_MAX, 0x3c00, 0xfe00, 0x7e00, "max(1, -NaN) is NaN"},
    {MC_FLOAT16, MC_MAX, 0xfc00, 0x0001, 0x0001, "max(-inf, subnormal)"},
    {MC_FLOAT16, MC_MIN, 0xfc00, 0x0001, 0xfc00, "min(-inf, subnormal)"},
    {MC_BFLOAT16, MC_SUM, 0x3f80, 0x3b80, 0x3f80, "1 + 2^-8: tie, rounds down to even"},
    {MC_BFLOAT16, MC_SUM, 0x3f81, 0x3b80, 0x3f82, "(1+2^-7) + 2^-8: tie, rounds up to even"},
    {MC_BFLOAT16, MC_SUM, 0x7f7f, 0x7f7f, 0x7f80, "max + max overflows to inf"},
    {MC_BFLOAT16, MC_SUM, 0x7f7f, 0x7300, 0x7f7f, "max + 2^103 rounds back to max"},
    {MC_BFLOAT16, MC_SUM, 0x0001, 0x0001, 0x0002, "subnormal + subnormal"},
    {MC_BFLOAT16, MC_PRODUCT, 0x0001, 0x3f00, 0x0000, "min subnormal * 0.5: tie to zero"},
    {MC_BFLOAT16, MC_PRODUCT, 0x0003, 0x3f00, 0x0002, "3 * min subnormal * 0.5: tie to even"},
    {MC_BFLOAT16, MC_SUM, 0x7f81, 0x0000, 0x7fc1, "signalling NaN stays NaN"},
    {MC_BFLOAT16, MC_SUM, 0x7f80, 0xff80, 0x7fc0, "inf + -inf is NaN"},
    {MC_BFLOAT16, MC_MAX, 0x7fff, 0x3f80, 0x7fff, "max(NaN with full payload, 1) is NaN"},
    {MC_BFLOAT16, MC_MIN, 0x3f80, 0xffff, 0xffff, "min(1, -NaN) is NaN"},
};

static int half_is_nan(mc_dtype_t d, uint16_t h) { return isnan(half_value(half_fmt(d), h)); }

static void test_half_cases(const char *path) {
  enum { N = 19 }; /* covers both a full vector and a scalar tail */
  for (size_t k = 0; k < sizeof half_cases / sizeof half_cases[0]; k++) {
    const half_case *t = &half_cases[k];
    uint16_t a[N], b[N];
    for (int i = 0; i < N; i++) {
      a[i] = t->a;
      b[i] = t->b;
    }
    mc_reduce_local(a, b, N, t->dtype, t->op);
    for (int i = 0; i < N; i++) {
      int ok = half_is_nan(t->dtype, t->want) ? half_is_nan(t->dtype, a[i]) : a[i] == t->want;
      CHECK(ok, "[%s] %s %s %#06x, %#06x (%s): got %#06x want %#06x (element %d)", path,
            mc_dtype_name(t->dtype), mc_redop_name(t->op), t->a, t->b, t->what, a[i], t->want, i);
    }
  }
}

/* ---- mc_scale_div ---- */

static void ref_div(mc_dtype_t d, const void *in, void *out, size_t i, int divisor) {
  if (d == MC_FLOAT32)
    put_float(d, out, i, (float)get_float(d, in, i) / (float)divisor);
  else if (d == MC_FLOAT64)
    put_float(d, out, i, get_float(d, in, i) / (double)divisor);
  else if (is_float(d)) /* through float32 */
    put_float(d, out, i, (double)((float)get_float(d, in, i) / (float)divisor));
  else
    put_int(d, out, i, get_int(d, in, i) / divisor); /* C division truncates */
}

static void check_div(const char *path, mc_dtype_t d, const void *in, size_t n, int divisor) {
  size_t size = mc_dtype_size(d), bytes = n * size + GUARD;
  unsigned char *buf = malloc(bytes), *want = malloc(bytes);
  memcpy(buf, in, n * size);
  memset(buf + n * size, 0x5a, GUARD);
  memcpy(want, buf, bytes);
  for (size_t i = 0; i < n; i++)
    ref_div(d, in, want, i, divisor);
  mc_scale_div(buf, n, d, divisor);
  for (size_t i = 0; i < n; i++)
    CHECK(same_element(d, MC_SUM, buf, want, i), "[%s] %s / %d: %#llx -> got %#llx want %#llx",
          path, mc_dtype_name(d), divisor, (unsigned long long)raw_bits(d, in, i),
          (unsigned long long)raw_bits(d, buf, i), (unsigned long long)raw_bits(d, want, i));
  CHECK(memcmp(buf + n * size, want + n * size, GUARD) == 0, "[%s] %s / %d: wrote past the end",
        path, mc_dtype_name(d), divisor);
  free(buf);
  free(want);
}

static void test_scale_div(const char *path) {
  static const int divisors[] = {1,    2,     3,     7,     8,       10,       255,    256,
                                 1000, 32767, 32768, 65535, 1 << 20, 16777217, INT_MAX};
  for (int di = 0; di < MC_DTYPE_COUNT; di++) {
    mc_dtype_t d = (mc_dtype_t)di;
    if (mc_reduce_supported(d, MC_AVG) != MC_OK || d == MC_COMPLEX64 || d == MC_COMPLEX128)
      continue; /* complex: test_complex */
    for (size_t c = 0; c < NCOUNTS; c++) {
      for (size_t k = 0; k < sizeof divisors / sizeof divisors[0]; k++) {
        size_t n = counts[c];
        void *in = malloc(n * mc_dtype_size(d) + 1);
        fill_random(d, in, n);
        check_div(path, d, in, n, divisors[k]);
        free(in);
      }
    }
  }

  /* Every int8/uint8/int16 value, every 16-bit float pattern, by many divisors: this is where
   * truncation of negative quotients and the float32 detour for 16-bit types show. */
  static const mc_dtype_t exhaustive[] = {MC_INT8, MC_UINT8, MC_INT16, MC_FLOAT16, MC_BFLOAT16};
  for (size_t e = 0; e < sizeof exhaustive / sizeof exhaustive[0]; e++) {
    mc_dtype_t d = exhaustive[e];
    size_t n = (size_t)1 << (8 * mc_dtype_size(d));
    void *in = malloc(n * mc_dtype_size(d));
    for (size_t i = 0; i < n; i++)
      memcpy((char *)in + i * mc_dtype_size(d), &i, mc_dtype_size(d)); /* little endian */
    for (int divisor = 2; divisor <= 17; divisor++)
      check_div(path, d, in, n, divisor);
    check_div(path, d, in, n, 1000);
    check_div(path, d, in, n, INT_MAX);
    free(in);
  }

  /* Extremes of the wide integers, where a float quotient would be off. */
  static const int64_t extremes[] = {INT64_MIN,
                                     INT64_MIN + 1,
                                     INT64_MAX,
                                     INT64_MAX - 1,
                                     (int64_t)1 << 53 | 1,
                                     -((int64_t)1 << 53 | 1),
                                     INT32_MIN,
                                     INT32_MAX,
                                     -7,
                                     7,
                                     -1,
                                     0};
  int64_t i64[12];
  int32_t i32[12];
  for (int i = 0; i < 12; i++) {
    i64[i] = extremes[i];
    i32[i] = (int32_t)(extremes[i] < INT32_MIN   ? INT32_MIN
                       : extremes[i] > INT32_MAX ? INT32_MAX
                                                 : extremes[i]);
  }
  for (size_t k = 0; k < sizeof divisors / sizeof divisors[0]; k++) {
    check_div(path, MC_INT64, i64, 12, divisors[k]);
    check_div(path, MC_INT32, i32, 12, divisors[k]);
  }

  /* Spot values written out by hand. */
  int32_t v[] = {-7, 7, -1, INT32_MIN};
  mc_scale_div(v, 4, MC_INT32, 2);
  CHECK(v[0] == -3 && v[1] == 3 && v[2] == 0 && v[3] == INT32_MIN / 2,
        "int32 / 2 truncates toward zero: got %d %d %d %d", v[0], v[1], v[2], v[3]);
  uint8_t u[] = {255, 1};
  mc_scale_div(u, 2, MC_UINT8, 2);
  CHECK(u[0] == 127 && u[1] == 0, "uint8 / 2: got %d %d", u[0], u[1]);
  float f[] = {1.0f, -INFINITY, NAN};
  mc_scale_div(f, 3, MC_FLOAT32, 3);
  CHECK(f[0] == 1.0f / 3.0f && f[1] == -INFINITY && isnan(f[2]), "float32 / 3: got %g %g %g", f[0],
        f[1], f[2]);
  uint16_t h[] = {0x3c00, 0x0001, 0x7bff};
  mc_scale_div(h, 3, MC_FLOAT16, 3);
  CHECK(h[0] == 0x3555 && h[1] == 0x0000 && h[2] == 0x7555, "float16 / 3: got %#x %#x %#x", h[0],
        h[1], h[2]);

  /* Divisors below 1 and bool leave the buffer alone. */
  int32_t keep[] = {5, -5};
  mc_scale_div(keep, 2, MC_INT32, 0);
  mc_scale_div(keep, 2, MC_INT32, -2);
  CHECK(keep[0] == 5 && keep[1] == -5, "divisor 0 / -2 must not change the buffer");
  uint8_t flags[] = {1, 0, 1};
  mc_scale_div(flags, 3, MC_BOOL, 2);
  CHECK(flags[0] == 1 && flags[1] == 0 && flags[2] == 1, "bool must not be divided");
  mc_scale_div(NULL, 0, MC_FLOAT32, 2);
}

/* ---- Complex numbers and PREMUL_SUM scaling ---- */

/* Complex SUM/AVG/PRODUCT against the textbook formulas in the part type (float or double). */
static void test_complex(void) {
  for (int k = 0; k < 2; k++) {
    mc_dtype_t d = k ? MC_COMPLEX128 : MC_COMPLEX64, part = k ? MC_FLOAT64 : MC_FLOAT32;
    for (size_t c = 0; c < NCOUNTS; c++) {
      size_t n = counts[c];
      unsigned char *a = malloc(n * 16 + 1), *b = malloc(n * 16 + 1), *x = malloc(n * 16 + 1),
                    *want = malloc(n * 16 + 1);
      fill_random(part, a, 2 * n);
      fill_random(part, b, 2 * n);
      for (int oi = 0; oi < 3; oi++) {
        mc_redop_t op = (mc_redop_t)oi; /* SUM, AVG, PRODUCT */
        memcpy(x, a, n * mc_dtype_size(d));
        mc_reduce_local(x, b, n, d, op);
        for (size_t i = 0; i < n; i++) {
          double ar = get_float(part, a, 2 * i), ai = get_float(part, a, 2 * i + 1);
          double br = get_float(part, b, 2 * i), bi = get_float(part, b, 2 * i + 1), re, im;
          if (op != MC_PRODUCT) {
            re = k ? ar + br : (float)ar + (float)br;
            im = k ? ai + bi : (float)ai + (float)bi;
          } else if (k) {
            re = ar * br - ai * bi, im = ar * bi + ai * br;
          } else {
            float fr = (float)ar * (float)br - (float)ai * (float)bi;
            float fi = (float)ar * (float)bi + (float)ai * (float)br;
            re = fr, im = fi;
          }
          put_float(part, want, 2 * i, re);
          put_float(part, want, 2 * i + 1, im);
          CHECK(same_element(part, op, x, want, 2 * i) &&
                    same_element(part, op, x, want, 2 * i + 1),
                "%s %s i=%zu: got (%g, %g) want (%g, %g)", mc_dtype_name(d), mc_redop_name(op), i,
                get_float(part, x, 2 * i), get_float(part, x, 2 * i + 1), re, im);
        }
      }
      /* AVG's division: each part on its own */
      memcpy(x, a, n * mc_dtype_size(d));
      mc_scale_div(x, n, d, 3);
      memcpy(want, a, n * mc_dtype_size(d));
      mc_scale_div(want, 2 * n, part, 3);
      CHECK(memcmp(x, want, n * mc_dtype_size(d)) == 0, "%s / 3 differs from its parts / 3",
            mc_dtype_name(d));
      free(a), free(b), free(x), free(want);
    }
  }
  /* (1+2i)(3+4i) = -5+10i */
  float p[2] = {1, 2}, q[2] = {3, 4};
  mc_reduce_local(p, q, 1, MC_COMPLEX64, MC_PRODUCT);
  CHECK(p[0] == -5 && p[1] == 10, "complex64 (1+2i)(3+4i) = %g%+gi", p[0], p[1]);
}

static void test_premul(void) {
  static const double factors[] = {0.5, 2, -3, 0.1, 1e-3, 65536};
  static const mc_dtype_t floats[] = {MC_FLOAT32, MC_FLOAT64, MC_FLOAT16, MC_BFLOAT16};
  for (size_t t = 0; t < 4; t++)
    for (size_t k = 0; k < sizeof factors / sizeof factors[0]; k++) {
      mc_dtype_t d = floats[t];
      size_t n = 1000, size = mc_dtype_size(d);
      unsigned char *in = malloc(n * size), *out = malloc(n * size), *want = malloc(n * size);
      fill_random(d, in, n);
      for (size_t i = 0; i < n; i++) {
        double x = get_float(d, in, i);
        put_float(d, want, i,
                  d == MC_FLOAT64 ? x * factors[k] : (double)((float)x * (float)factors[k]));
      }
      mc_premul(out, in, n, d, factors[k]);
      for (size_t i = 0; i < n; i++)
        CHECK(same_element(d, MC_SUM, out, want, i), "premul %s x %g i=%zu", mc_dtype_name(d),
              factors[k], i);
      mc_premul(in, in, n, d, factors[k]); /* in place */
      for (size_t i = 0; i < n; i++)
        CHECK(same_element(d, MC_SUM, in, want, i), "premul in place %s x %g i=%zu",
              mc_dtype_name(d), factors[k], i);
      free(in), free(out), free(want);
    }
}

/* ---- Tables and edge cases of the API ---- */

/* The support matrix, written out from the spec rather than from the kernel table. */
static int expected_support(mc_dtype_t d, mc_redop_t op) {
  int integer = d == MC_INT8 || d == MC_INT16 || d == MC_INT32 || d == MC_INT64 || d == MC_UINT8;
  int complex = d == MC_COMPLEX64 || d == MC_COMPLEX128;
  switch (op) {
  case MC_SUM:
  case MC_PRODUCT: return is_float(d) || integer || complex || d == MC_BOOL;
  case MC_AVG: return is_float(d) || integer || complex;
  case MC_MIN:
  case MC_MAX: return is_float(d) || integer || d == MC_BOOL;
  case MC_BAND:
  case MC_BOR:
  case MC_BXOR: return integer || d == MC_BOOL;
  case MC_PREMUL_SUM: return is_float(d);
  default: return 0;
  }
}

static void test_tables(void) {
  static const char *const dtype_names[] = {
      "float32",         "float64",       "float16",       "bfloat16",    "int8",
      "int16",           "int32",         "int64",         "uint8",       "bool",
      "complex64",       "complex128",    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
      "float8_e5m2fnuz", "float8_e8m0fnu"};
  static const size_t sizes[] = {4, 8, 2, 2, 1, 2, 4, 8, 1, 1, 8, 16, 1, 1, 1, 1, 1};
  static const char *const op_names[] = {"sum",  "avg", "product", "min",       "max",
                                         "band", "bor", "bxor",    "premul_sum"};
  _Static_assert(sizeof sizes / sizeof sizes[0] == MC_DTYPE_COUNT, "dtype table");
  _Static_assert(sizeof op_names / sizeof op_names[0] == MC_REDOP_COUNT, "op table");
  for (int d = 0; d < MC_DTYPE_COUNT; d++) {
    CHECK(strcmp(mc_dtype_name((mc_dtype_t)d), dtype_names[d]) == 0, "dtype %d name %s", d,
          mc_dtype_name((mc_dtype_t)d));
    CHECK(mc_dtype_size((mc_dtype_t)d) == sizes[d], "dtype %s size %zu", dtype_names[d],
          mc_dtype_size((mc_dtype_t)d));
  }
  for (int op = 0; op < MC_REDOP_COUNT; op++)
    CHECK(strcmp(mc_redop_name((mc_redop_t)op), op_names[op]) == 0, "op %d name %s", op,
          mc_redop_name((mc_redop_t)op));
  CHECK(strcmp(mc_dtype_name(MC_DTYPE_COUNT), "?") == 0, "invalid dtype name");
  CHECK(strcmp(mc_dtype_name((mc_dtype_t)-1), "?") == 0, "negative dtype name");
  CHECK(strcmp(mc_redop_name(MC_REDOP_COUNT), "?") == 0, "invalid op name");
  CHECK(strcmp(mc_redop_name((mc_redop_t)-1), "?") == 0, "negative op name");
  CHECK(mc_dtype_size(MC_DTYPE_COUNT) == 0, "invalid dtype size");

  for (int d = 0; d < MC_DTYPE_COUNT; d++)
    for (int op = 0; op < MC_REDOP_COUNT; op++) {
      mc_status_t want =
          expected_support((mc_dtype_t)d, (mc_redop_t)op) ? MC_OK : MC_ERR_UNSUPPORTED;
      CHECK(mc_reduce_supported((mc_dtype_t)d, (mc_redop_t)op) == want, "supported(%s, %s)",
            dtype_names[d], op_names[op]);
    }
  CHECK(mc_reduce_supported(MC_DTYPE_COUNT, MC_SUM) == MC_ERR_INVALID, "supported(bad dtype)");
  CHECK(mc_reduce_supported((mc_dtype_t)-1, MC_SUM) == MC_ERR_INVALID, "supported(-1 dtype)");
  CHECK(mc_reduce_supported(MC_FLOAT32, MC_REDOP_COUNT) == MC_ERR_INVALID, "supported(bad op)");
  CHECK(mc_reduce_supported(MC_FLOAT32, (mc_redop_t)-1) == MC_ERR_INVALID, "supported(-1 op)");

  /* Invalid enums and count 0 touch nothing. */
  int32_t x[2] = {1, 2}, y[2] = {3, 4};
  mc_reduce_local(x, y, 2, MC_DTYPE_COUNT, MC_SUM);
  mc_reduce_local(x, y, 2, MC_INT32, MC_REDOP_COUNT);
  mc_reduce_local(x, y, 0, MC_INT32, MC_SUM);
  mc_reduce_local(NULL, NULL, 0, MC_FLOAT16, MC_SUM);
  CHECK(x[0] == 1 && x[1] == 2, "invalid dtype/op or count 0 changed dst");

  /* AVG reduces exactly like SUM. */
  int32_t s[3] = {1, -2, INT32_MAX}, t[3] = {5, 5, 1};
  mc_reduce_local(s, t, 3, MC_INT32, MC_AVG);
  CHECK(s[0] == 6 && s[1] == 3 && s[2] == INT32_MIN, "int32 AVG is a wrapping sum");

  /* Bool results are always 0/1, even from non-canonical nonzero bytes. */
  uint8_t p[4] = {2, 0, 2, 0}, q[4] = {0, 0, 4, 2};
  mc_reduce_local(p, q, 4, MC_BOOL, MC_SUM);
  CHECK(p[0] == 1 && p[1] == 0 && p[2] == 1 && p[3] == 1, "bool OR normalises to 0/1");
  uint8_t r[2] = {2, 2}, z[2] = {4, 0};
  mc_reduce_local(r, z, 2, MC_BOOL, MC_MIN);
  CHECK(r[0] == 1 && r[1] == 0, "bool AND normalises to 0/1");

  /* Hand-checked integer wrap-around. */
  int8_t a8[3] = {127, -128, 16}, b8[3] = {1, -1, 16};
  mc_reduce_local(a8, b8, 3, MC_INT8, MC_SUM);
  CHECK(a8[0] == -128 && a8[1] == 127 && a8[2] == 32, "int8 sum wraps");
  int16_t a16[1] = {-32768}, b16[1] = {-1};
  mc_reduce_local(a16, b16, 1, MC_INT16, MC_PRODUCT);
  CHECK(a16[0] == -32768, "int16 -32768 * -1 wraps to -32768");
  int64_t a64[1] = {INT64_MAX}, b64[1] = {2};
  mc_reduce_local(a64, b64, 1, MC_INT64, MC_PRODUCT);
  CHECK(a64[0] == -2, "int64 max * 2 wraps to -2");
  uint8_t au[1] = {200}, bu[1] = {100};
  mc_reduce_local(au, bu, 1, MC_UINT8, MC_SUM);
  CHECK(au[0] == 44, "uint8 200 + 100 wraps to 44");
}

/* mc_reduce_many against the pairwise kernels folded in the same order (bitwise, NaN = NaN);
 * 16-bit floats against one float32 accumulation rounded once. Counts cross its blocks; one
 * case is in place (dst is input 2, which then comes first). */
static void test_reduce_many(const char *path) {
  static const size_t many_counts[] = {1, 257, 5000};
  enum { MAXSRC = 5 };
  for (int di = 0; di < MC_DTYPE_COUNT; di++) {
    mc_dtype_t d = (mc_dtype_t)di;
    size_t esz = mc_dtype_size(d);
    for (int oi = 0; oi < MC_REDOP_COUNT; oi++) {
      mc_redop_t op = (mc_redop_t)oi;
      if (mc_reduce_supported(d, op) != MC_OK)
        continue;
      for (size_t ci = 0; ci < sizeof many_counts / sizeof *many_counts; ci++) {
        size_t n = many_counts[ci], bytes = n * esz;
        for (int nsrc = 1; nsrc <= MAXSRC; nsrc += 2) {
          for (int in_place = 0; in_place < 2 && (!in_place || nsrc >= 3); in_place++) {
            char *src[MAXSRC], *dst = malloc(bytes), *want = malloc(bytes);
            const void *srcs[MAXSRC];
            for (int k = 0; k < nsrc; k++) {
              src[k] = malloc(bytes);
              fill_random(d, src[k], n);
              srcs[k] = src[k];
            }
            int first = in_place ? 2 : 0;
            if (d == MC_FLOAT16 || d == MC_BFLOAT16) {
              for (size_t i = 0; i < n; i++) {
                float acc = (float)get_float(d, src[first], i);
                for (int k = 0; k < nsrc; k++) {
                  float b = (float)get_float(d, src[k], i);
                  if (k == first)
                    continue;
                  acc = op == MC_PRODUCT ? acc * b
                        : op == MC_MIN   ? ((acc < b || acc != acc) ? acc : b)
                        : op == MC_MAX   ? ((acc > b || acc != acc) ? acc : b)
                                         : acc + b;
                }
                put_float(d, want, i, acc);
              }
            } else {
              memcpy(want, src[first], bytes);
              for (int k = 0; k < nsrc; k++)
                if (k != first)
                  mc_reduce_local(want, src[k], n, d, op);
            }
            if (in_place) {
              memcpy(dst, src[2], bytes);
              srcs[2] = dst;
            }
            mc_reduce_many(dst, srcs, nsrc, n, d, op);
            size_t bad = n;
            for (size_t i = 0; i < n && bad == n; i++)
              if (!same_element(d, op, dst, want, i))
                bad = i;
            CHECK(bad == n, "[%s] reduce_many %s %s count=%zu inputs=%d%s: element %zu differs",
                  path, mc_dtype_name(d), mc_redop_name(op), n, nsrc, in_place ? " in place" : "",
                  bad);
            for (int k = 0; k < nsrc; k++)
              free(src[k]);
            free(dst);
            free(want);
          }
        }
      }
    }
  }
}

/* mc_copy at sizes on both sides of its own loop's range, misaligned, with guard bytes. */
static void test_copy(void) {
  static const size_t sizes[] = {0,        1,     63,     2047,   2048,  2049,
                                 4096 + 7, 65536, 262143, 262144, 300001};
  for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++)
    for (size_t off = 0; off < 3; off++) {
      size_t n = sizes[i];
      unsigned char *src = malloc(n + 8), *dst = malloc(n + 8 + GUARD);
      for (size_t k = 0; k < n + 8; k++)
        src[k] = (unsigned char)rng();
      memset(dst, 0xa5, n + 8 + GUARD);
      mc_copy(dst + off, src + 1, n);
      int guard_ok = 1;
      for (size_t k = 0; k < GUARD; k++)
        guard_ok &= dst[off + n + k] == 0xa5;
      CHECK(memcmp(dst + off, src + 1, n) == 0 && guard_ok, "mc_copy %zu bytes at offset %zu", n,
            off);
      free(src);
      free(dst);
    }
}

int main(void) {
  test_tables();
  int hardware = mc_reduce_use_f16c(1);
  const char *paths[] = {hardware ? "f16c" : "portable", "portable"};
  for (int p = 0; p < (hardware ? 2 : 1); p++) {
    if (p == 1)
      mc_reduce_use_f16c(0);
    test_reduce_all(paths[p]);
    test_half_cases(paths[p]);
    test_scale_div(paths[p]);
    test_premul();
    test_reduce_many(paths[p]);
  }
  test_complex();
  test_copy();
  if (failures) {
    printf("test_reduce: %ld of %ld checks FAILED\n", failures, checks);
    return 1;
  }
  printf("test_reduce: %ld checks passed (float16 paths: %s)\n", checks,
         hardware ? "f16c, portable" : "portable");
  return 0;
}
