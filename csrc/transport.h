/* The one interface between the engine and its transports (backend/). The engine calls it from
 * the communicator's progress thread only. */
#ifndef MOONCAKE_TRANSPORT_H
#define MOONCAKE_TRANSPORT_H

#include "mooncake/mooncake.h"

#include <stdbool.h>

typedef struct mc_transport mc_transport_t;

/* Space a transport may use inside each posted transfer (e.g. a struct fi_context2). */
typedef struct {
  void *opaque[8];
} mc_transport_ctx_t;

typedef struct {
  void *ctx; /* the mc_transport_ctx_t passed when posting */
  mc_status_t status;
  size_t len;        /* bytes received */
  uint64_t tag;      /* matched tag (receives) */
  uint64_t data;     /* remote CQ data (receives); 0 when the transport has none */
  const char *error; /* transport's words when status != MC_OK */
  size_t overflow;   /* MC_ERR_MISMATCH: bytes that did not fit the receive, 0 if unknown */
} mc_completion_t;

typedef struct {
  const char *provider; /* NULL: auto */
  bool all_local;       /* every rank on this host */
  uint64_t comm_id;
  int rank; /* unique per process among the endpoints of comm_id (a lineage rank) */
  int size;
} mc_transport_params_t;

typedef struct {
  const char *name;
  mc_status_t (*open)(const mc_transport_params_t *p, mc_transport_t **out, char *err,
                      size_t errlen);
  const char *(*provider)(mc_transport_t *t);
  mc_status_t (*get_address)(mc_transport_t *t, void *buf, size_t *len);
  /* addresses of all ranks, in rank order (own included); may be called again with a new
   * order (a shrink re-addresses its standby endpoint, pre-connected in the old order) */
  mc_status_t (*set_peers)(mc_transport_t *t, void *const *addrs, const size_t *lens, int n);
  /* MC_ERR_TIMEOUT here means "try again later" (queue full) */
  mc_status_t (*send)(mc_transport_t *t, int peer, const void *buf, size_t len, uint64_t tag,
                      uint64_t data, mc_transport_ctx_t *ctx);
  /* peer < 0: any source. Tags match exactly: libfabric 1.17 shm never matched wildcard tags
   * against messages that arrived before the receive (docs/transports.md). */
  mc_status_t (*recv)(mc_transport_t *t, int peer, void *buf, size_t len, uint64_t tag,
                      mc_transport_ctx_t *ctx);
  int (*poll)(mc_transport_t *t, mc_completion_t *out, int max); /* completions read */
  void (*cancel)(mc_transport_t *t, mc_transport_ctx_t *ctx);
  /* Before sleeping: fd to wait on (or -1) and whether sleeping is safe now. backstop_us > 0
   * asks the caller to wake up that often while work is pending (no reliable fd). */
  bool (*prepare_sleep)(mc_transport_t *t, int *fd, int *backstop_us);
  void (*after_sleep)(mc_transport_t *t);       /* drain wake-up notifications */
  const char *(*last_error)(mc_transport_t *t); /* why the last send/recv post failed */
  void (*close)(mc_transport_t *t);
} mc_transport_ops_t;

extern const mc_transport_ops_t mc_ofi_transport;

#endif
