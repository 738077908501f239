/* Element-wise reduction kernels used by the collective algorithms. */
#ifndef MOONCAKE_REDUCE_H
#define MOONCAKE_REDUCE_H

#include "mooncake/mooncake.h"

/* dst[i] = dst[i] op src[i] for i < count. MC_AVG reduces as MC_SUM (the caller divides at the
 * end), as does MC_PREMUL_SUM (inputs scaled first). dst and src must not overlap. An invalid dtype
 * or op does nothing: callers validate with mc_reduce_supported() first. */
void mc_reduce_local(void *dst, const void *src, size_t count, mc_dtype_t dtype, mc_redop_t op);

/* memcpy for the engine's bulk copies (no overlap); faster than glibc's for 2-256 KiB on x86. */
void mc_copy(void *dst, const void *src, size_t n);

/* dst = srcs[0] op srcs[1] op ... (in that order; starting from the one dst is, if dst is one
 * of them), cache block by cache block, so that every input and the output cross memory once.
 * float16 and bfloat16 accumulate all inputs in float32 and round once. MC_AVG and
 * MC_PREMUL_SUM sum, as in mc_reduce_local. dst may equal one source; no other overlap. */
void mc_reduce_many(void *dst, const void *const *srcs, int nsrc, size_t count, mc_dtype_t dtype,
                    mc_redop_t op);

/* buf[i] /= divisor (floats: true division done in the type's precision, 16-bit types via
 * float32; integers: C truncating division). divisor < 1 and MC_BOOL leave buf unchanged. */
void mc_scale_div(void *buf, size_t count, mc_dtype_t dtype, int divisor);

/* dst[i] = src[i] * factor for PREMUL_SUM (float types; others: nothing). dst may equal src. */
void mc_premul(void *dst, const void *src, size_t count, mc_dtype_t dtype, double factor);

/* For tests: enable = 0 makes float16 use the portable conversion even where the CPU has F16C.
 * Returns whether the hardware conversion is now in use. Call it before any reduction runs. */
int mc_reduce_use_f16c(int enable);

#endif
