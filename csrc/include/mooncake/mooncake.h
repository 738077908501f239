/* Mooncake collective engine: public C API.
 *
 * Every operation is asynchronous: it returns a request at once and a progress thread owned by
 * the communicator moves the data. Buffers must stay valid until the request completes. Every
 * wait is bounded: an operation that does not finish within the communicator's timeout fails
 * with MC_ERR_TIMEOUT, and a peer that the transport reports as failed fails the operations
 * that depend on it with MC_ERR_PEER_FAILED. Errors are values; mc_request_error() gives a
 * message that names the rank, the operation and the cause. */
#ifndef MOONCAKE_MOONCAKE_H
#define MOONCAKE_MOONCAKE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MC_VERSION_MAJOR 0
#define MC_VERSION_MINOR 1

typedef enum {
  MC_OK = 0,
  MC_ERR_INVALID, /* bad argument (null buffer, rank out of range, bad dtype/op) */
  MC_ERR_NOMEM,
  MC_ERR_TIMEOUT,     /* operation or wait exceeded its deadline */
  MC_ERR_PEER_FAILED, /* a peer this operation depends on failed */
  MC_ERR_REVOKED,     /* communicator is broken/revoked; no further operations */
  MC_ERR_MISMATCH,    /* ranks called the operation with different sizes/types */
  MC_ERR_TRANSPORT,   /* the transport failed locally */
  MC_ERR_UNSUPPORTED, /* dtype x op combination or feature not supported */
  MC_ERR_INTERNAL,
} mc_status_t;

typedef enum {
  MC_FLOAT32 = 0,
  MC_FLOAT64,
  MC_FLOAT16,
  MC_BFLOAT16, /* 16-bit types are reduced with float32 accumulation */
  MC_INT8,
  MC_INT16,
  MC_INT32,
  MC_INT64,
  MC_UINT8,
  MC_BOOL,
  MC_COMPLEX64,  /* (real, imag) float32 pairs: SUM, AVG, PRODUCT only */
  MC_COMPLEX128, /* (real, imag) float64 pairs: SUM, AVG, PRODUCT only */
  /* float8 types are moved by the non-reducing operations and rejected by reducing ones */
  MC_FLOAT8_E4M3FN,
  MC_FLOAT8_E5M2,
  MC_FLOAT8_E4M3FNUZ,
  MC_FLOAT8_E5M2FNUZ,
  MC_FLOAT8_E8M0FNU,
  MC_DTYPE_COUNT
} mc_dtype_t;

typedef enum {
  MC_SUM = 0,
  MC_AVG, /* SUM then divide by the communicator size (integers: truncating division) */
  MC_PRODUCT,
  MC_MIN,
  MC_MAX,
  MC_BAND, /* bitwise AND, OR, XOR: integer and bool dtypes only (bool: logical) */
  MC_BOR,
  MC_BXOR,
  /* SUM of each rank's input multiplied by a per-call factor: only through the *_premul calls,
   * floating-point dtypes only */
  MC_PREMUL_SUM,
  MC_REDOP_COUNT
} mc_redop_t;

#define MC_ANY_SOURCE (-1)
#define MC_TAG_MAX ((1 << 24) - 1) /* largest user tag for send/recv */

typedef struct mc_comm mc_comm_t;
typedef struct mc_request mc_request_t;

/* Rendezvous goes through the caller's key-value store (torch's c10d Store in practice).
 * get() blocks until the key exists or timeout_ms passes; it returns a malloc'd copy of the
 * value in *val that the engine releases with free(). */
typedef struct {
  void *ctx;
  mc_status_t (*set)(void *ctx, const char *key, const void *val, size_t len);
  mc_status_t (*get)(void *ctx, const char *key, void **val, size_t *len, int timeout_ms);
  mc_status_t (*add)(void *ctx, const char *key, int64_t delta, int64_t *out);
} mc_store_t;

typedef struct {
  int timeout_ms;        /* deadline of each operation and of setup; <= 0: MC_TIMEOUT_MS */
  const char *transport; /* NULL: MC_TRANSPORT, else auto (shm on one host, tcp across hosts) */
  const char *name;      /* shown in log and error messages (e.g. the torch group name) */
} mc_config_t;

void mc_config_init(mc_config_t *cfg);

/* Collective over all `size` ranks: every rank must call it with the same store. */
mc_status_t mc_comm_create(const mc_config_t *cfg, const mc_store_t *store, int rank, int size,
                           mc_comm_t **out);
int mc_comm_rank(const mc_comm_t *comm);
int mc_comm_size(const mc_comm_t *comm);
const char *mc_comm_transport(const mc_comm_t *comm); /* provider in use, e.g. "shm" */
mc_status_t mc_comm_set_timeout(mc_comm_t *comm, int timeout_ms);
/* Fails every pending and later operation with MC_ERR_REVOKED. Local, returns at once. */
mc_status_t mc_comm_abort(mc_comm_t *comm);
/* Aborts what is still pending, stops the progress thread and frees everything. Never waits
 * on peers. Requests not yet freed stay valid (completed) until mc_request_free. */
mc_status_t mc_comm_destroy(mc_comm_t *comm);

/* Fault tolerance (docs/fault-tolerance.md). Every rank watches every other over a control
 * connection: a dead process is noticed at once, a hung or cut-off one after
 * MC_FAILURE_TIMEOUT_MS. A failure revokes the communicator on every survivor: pending and
 * later operations fail with MC_ERR_PEER_FAILED or MC_ERR_REVOKED; the output buffers of a
 * failed operation hold unspecified data. */

/* Revokes the communicator here and on every peer. Returns at once. */
mc_status_t mc_comm_revoke(mc_comm_t *comm);
/* Ranks of this communicator known to have failed (up to max written); returns the count. */
int mc_comm_failed_ranks(mc_comm_t *comm, int *ranks, int max);
/* Collective over the survivors: they agree on who failed (plus `exclude`, ranks of this
 * communicator that every caller passes), then build a new communicator of the rest,
 * renumbered in rank order, without the store. A member that fails during the call leaves the
 * new communicator revoked (shrink it again); the old one stays valid until destroyed. */
mc_status_t mc_comm_shrink(mc_comm_t *comm, const int *exclude, int n, mc_comm_t **out);
/* The rank that `rank` of this communicator had in the communicator its lineage was created
 * as (mc_comm_create); lets callers map ranks across shrinks. */
int mc_comm_origin_rank(const mc_comm_t *comm, int rank);

/* Collectives. in == out is allowed (in place). count may be 0. */
mc_status_t mc_allreduce(mc_comm_t *comm, const void *in, void *out, size_t count, mc_dtype_t dtype,
                         mc_redop_t op, mc_request_t **req);
/* out holds size * count elements, rank r's block at r * count. in may equal out + rank*count. */
mc_status_t mc_allgather(mc_comm_t *comm, const void *in, void *out, size_t count, mc_dtype_t dtype,
                         mc_request_t **req);
/* in holds size * count elements; out (count elements) gets block `rank` reduced over all
 * ranks. A true reduce-scatter: each rank sends (size-1) * count elements, not an allreduce. */
mc_status_t mc_reduce_scatter(mc_comm_t *comm, const void *in, void *out, size_t count,
                              mc_dtype_t dtype, mc_redop_t op, mc_request_t **req);
mc_status_t mc_broadcast(mc_comm_t *comm, void *buf, size_t count, mc_dtype_t dtype, int root,
                         mc_request_t **req);
/* out (count elements, used on root only: may be NULL elsewhere) = op over ranks of in.
 * in == out is allowed on root; in is never written. */
mc_status_t mc_reduce(mc_comm_t *comm, const void *in, void *out, size_t count, mc_dtype_t dtype,
                      mc_redop_t op, int root, mc_request_t **req);
/* Root's out (size * count elements; ignored elsewhere) gets rank r's in at r * count.
 * in may equal out + root * count on root. */
mc_status_t mc_gather(mc_comm_t *comm, const void *in, void *out, size_t count, mc_dtype_t dtype,
                      int root, mc_request_t **req);
/* Rank r's out (count elements) gets block r of root's in (size * count; ignored elsewhere).
 * out may equal in + root * count on root. */
mc_status_t mc_scatter(mc_comm_t *comm, const void *in, void *out, size_t count, mc_dtype_t dtype,
                       int root, mc_request_t **req);
/* Block j (count elements) of in goes to rank j, which stores it as block `rank` of its out.
 * in and out hold size * count elements each and must not overlap. */
mc_status_t mc_alltoall(mc_comm_t *comm, const void *in, void *out, size_t count, mc_dtype_t dtype,
                        mc_request_t **req);
/* Uneven all-to-all; counts and displacements are in elements, one per rank. Rank i's
 * send_counts[j] must equal rank j's recv_counts[i] (zero allowed). The arrays are copied;
 * in and out must not overlap. */
mc_status_t mc_alltoallv(mc_comm_t *comm, const void *in, const size_t *send_counts,
                         const size_t *send_displs, void *out, const size_t *recv_counts,
                         const size_t *recv_displs, mc_dtype_t dtype, mc_request_t **req);

/* PREMUL_SUM: like the calls above with op MC_PREMUL_SUM, each rank's input multiplied by
 * `factor` (in the dtype's arithmetic; float32 for 16-bit floats) before the sum. The factor
 * may differ between ranks. Floating-point dtypes only. */
mc_status_t mc_allreduce_premul(mc_comm_t *comm, const void *in, void *out, size_t count,
                                mc_dtype_t dtype, double factor, mc_request_t **req);
mc_status_t mc_reduce_scatter_premul(mc_comm_t *comm, const void *in, void *out, size_t count,
                                     mc_dtype_t dtype, double factor, mc_request_t **req);
mc_status_t mc_reduce_premul(mc_comm_t *comm, const void *in, void *out, size_t count,
                             mc_dtype_t dtype, double factor, int root, mc_request_t **req);
mc_status_t mc_barrier(mc_comm_t *comm, mc_request_t **req);

/* Point to point, matched by (source, tag) in posting order. 0 <= tag <= MC_TAG_MAX.
 * recv accepts peer == MC_ANY_SOURCE; mc_request_source() then tells who sent. */
mc_status_t mc_send(mc_comm_t *comm, const void *buf, size_t count, mc_dtype_t dtype, int peer,
                    int tag, mc_request_t **req);
mc_status_t mc_recv(mc_comm_t *comm, void *buf, size_t count, mc_dtype_t dtype, int peer, int tag,
                    mc_request_t **req);

/* Requests. */
typedef void (*mc_callback_t)(mc_request_t *req, void *arg);
/* Runs fn once when the request completes: on the progress thread, or at once on the caller's
 * thread if it already has. fn must not block on other operations of the same communicator. */
mc_status_t mc_request_on_complete(mc_request_t *req, mc_callback_t fn, void *arg);
/* Blocks until completion or timeout_ms (< 0: no extra limit; the operation's own deadline
 * still applies). Returns the operation's status, or MC_ERR_TIMEOUT if the wait timed out
 * while the operation goes on: its buffers stay in use until it completes (on one host the
 * peers may be reading them directly), so do not free or reuse them before it completes
 * (mc_comm_abort makes it complete promptly, with an error). */
mc_status_t mc_wait(mc_request_t *req, int timeout_ms);
/* Non-blocking: *done = 1 when complete; returns the status so far (MC_OK while running). */
mc_status_t mc_test(mc_request_t *req, int *done);
const char *mc_request_error(const mc_request_t *req); /* "" when the request succeeded */
int mc_request_source(const mc_request_t *req);        /* sender of a completed recv */
/* Releases the caller's reference; a running operation keeps going and is freed when done. */
void mc_request_free(mc_request_t *req);

/* Why the last call on this thread that returned an error without a request failed
 * (mc_comm_create, or an operation rejected before it started). */
const char *mc_last_error(void);

const char *mc_status_str(mc_status_t s);
const char *mc_dtype_name(mc_dtype_t t);
const char *mc_redop_name(mc_redop_t op);
size_t mc_dtype_size(mc_dtype_t t);
/* MC_OK if the reducing operations support this dtype x op, MC_ERR_UNSUPPORTED otherwise. */
mc_status_t mc_reduce_supported(mc_dtype_t t, mc_redop_t op);

#ifdef __cplusplus
}
#endif
#endif
