/* libfabric RDM transport: tagged messages with 8 bytes of remote CQ data, one endpoint per
 * communicator, peers addressed by rank through an AV table.
 *
 * Waking up: providers whose CQ offers a wait fd (tcp;ofi_rxm) are slept on directly. The shm
 * provider has none, and its receiver must run for a sender's large (CMA) transfer to finish,
 * so each rank also owns a "doorbell" datagram socket: a sender rings the receiver after
 * posting, and a receiver rings the sender after a transfer larger than the inject size.
 *
 * Streams (MC_OFI_STREAMS = K > 1, tcp): K endpoints share the CQ and the AV, so each peer pair
 * has K connections. A collective message of at least MC_OFI_STRIPE_BYTES goes as up to K
 * pieces, piece i on endpoint i with i in the tag's top bits; the transfer completes when every
 * piece has. p2p messages and smaller ones use endpoint 0 (posting order, any-source). */
#include <errno.h>
#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_tagged.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "param.h"
#include "transport.h"

#define MAX_STREAMS 8
#define TAG_P2P (1ULL << 27) /* MC_TAG_P2P in csrc/internal.h: p2p messages are never striped */
#define TAG_PIECE_SHIFT 60   /* the engine leaves the top 4 tag bits 0 */

struct stripe;

struct mc_transport {
  struct fi_info *info;
  struct fid_fabric *fabric;
  struct fid_domain *domain;
  struct fid_av *av;
  struct fid_cq *cq;
  struct fid_ep *ep; /* = eps[0] */
  struct fid_ep *eps[MAX_STREAMS];
  int nstreams;
  size_t stripe_min;
  fi_addr_t *peers;       /* peer r's stream s: peers[r * nstreams + s] */
  int *peer_streams;      /* streams used with peer r: min of both ends */
  struct stripe *live;    /* striped transfers with pieces in flight or not yet posted */
  int unposted;           /* pieces waiting for queue space */
  mc_completion_t *ready; /* completions of striped transfers, not yet returned by poll */
  int nready, ready_cap;
  int *peer_keys; /* each peer's doorbell key, from the tail of its address */
  int npeers;
  int key;      /* this endpoint's doorbell key (params.rank) */
  int cq_fd;    /* -1: provider has no wait fd; use the doorbell */
  int doorbell; /* datagram socket, or -1 */
  uint64_t comm_id;
  size_t inject_size;
  char error[256];
};

static void doorbell_address(uint64_t comm_id, int rank, struct sockaddr_un *a, socklen_t *len) {
  memset(a, 0, sizeof *a);
  a->sun_family = AF_UNIX;
  /* abstract namespace: nothing on disk to clean up, gone when the process is */
  int n = snprintf(a->sun_path + 1, sizeof a->sun_path - 1, "mooncake/%016llx/%d",
                   (unsigned long long)comm_id, rank);
  *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + n);
}

static void ring(mc_transport_t *t, int peer) {
  if (t->doorbell < 0 || peer < 0)
    return;
  struct sockaddr_un a;
  socklen_t len;
  doorbell_address(t->comm_id, t->peer_keys[peer], &a, &len);
  char b = 1;
  /* a full queue already holds a wake-up for the peer */
  (void)sendto(t->doorbell, &b, 1, MSG_DONTWAIT, (struct sockaddr *)&a, len);
}

static void stripes_free(mc_transport_t *t);

static void ofi_close(mc_transport_t *t) {
  if (!t)
    return;
  for (int i = MAX_STREAMS - 1; i > 0; i--)
    if (t->eps[i])
      fi_close(&t->eps[i]->fid);
  if (t->ep)
    fi_close(&t->ep->fid);
  stripes_free(t);
  if (t->av)
    fi_close(&t->av->fid);
  if (t->cq)
    fi_close(&t->cq->fid);
  if (t->domain)
    fi_close(&t->domain->fid);
  if (t->fabric)
    fi_close(&t->fabric->fid);
  if (t->info)
    fi_freeinfo(t->info);
  if (t->doorbell >= 0)
    close(t->doorbell);
  free(t->peers);
  free(t->peer_streams);
  free(t->peer_keys);
  free(t->ready);
  free(t);
}

#define OFI_TRY(call, what)                                                                        \
  do {                                                                                             \
    int rc_ = (call);                                                                              \
    if (rc_) {                                                                                     \
      snprintf(err, errlen, "libfabric %s (%s) failed: %s", what, prov, fi_strerror(-rc_));        \
      ofi_close(t);                                                                                \
      return MC_ERR_TRANSPORT;                                                                     \
    }                                                                                              \
  } while (0)

static mc_status_t ofi_open(const mc_transport_params_t *p, mc_transport_t **out, char *err,
                            size_t errlen) {
  /* Auto picks tcp even on one host: libfabric 1.17's shm provider intermittently never
   * matches messages that arrived before their receive was posted once 3+ ranks talk to one
   * rank (docs/transports.md has the reproducer). shm stays available via MC_TRANSPORT=shm;
   * the intra-host fast path is our own shared-memory transport (backend/shm, planned). */
  const char *prov = p->provider ? p->provider : "tcp";
  mc_transport_t *t = calloc(1, sizeof *t);
  if (!t)
    return MC_ERR_NOMEM;
  t->cq_fd = -1;
  t->doorbell = -1;
  t->comm_id = p->comm_id;
  t->key = p->rank;

  struct fi_info *hints = fi_allocinfo();
  if (!hints) {
    free(t);
    return MC_ERR_NOMEM;
  }
  hints->caps = FI_TAGGED | FI_DIRECTED_RECV;
  hints->mode = 0;
  hints->ep_attr->type = FI_EP_RDM;
  hints->domain_attr->threading = FI_THREAD_DOMAIN; /* only the progress thread calls in */
  hints->domain_attr->mr_mode = 0;
  hints->domain_attr->cq_data_size = 8;
  hints->tx_attr->msg_order = FI_ORDER_SAS; /* p2p messages match in posting order */
  hints->rx_attr->msg_order = FI_ORDER_SAS;
  hints->fabric_attr->prov_name = strdup(prov);
  const char *iface = mc_param_str(MC_PARAM_OFI_IFACE);
  if (*iface)
    hints->domain_attr->name = strdup(iface);
  setenv("FI_OFI_RXM_ENABLE_DYN_RBUF", "0", 0); /* else a truncated recv drops the tcp link */
  /* rxm over tcp posts a shared pool of 4096 bounce buffers of 16 KiB by default: fi_enable
   * faulted in ~70 MB (50 ms of CPU) and fi_close freed it (8 ms). On 2 cores, 8 ranks opening
   * their standby and closing the broken endpoint made a shrink wait 20-40 ms for the CPU.
   * 1024 buffers: 18 MB, 19 ms, closed in 0.2 ms, and p2p over tcp as fast (32 was 25-45 %
   * slower for 2-16 MiB sendrecv between namespaces). Over tcp only: verbs sizes its own. */
  if (strstr(prov, "tcp"))
    setenv("FI_OFI_RXM_MSG_RX_SIZE", "1024", 0);
  int rc = fi_getinfo(FI_VERSION(1, 17), NULL, NULL, 0, hints, &t->info);
  fi_freeinfo(hints);
  if (rc || !t->info) {
    snprintf(err, errlen,
             "libfabric has no RDM endpoint for provider '%s'%s%s (%s); "
             "check `fi_info -p %s -t FI_EP_RDM` or set MC_TRANSPORT",
             prov, *iface ? " on interface " : "", iface, fi_strerror(-rc), prov);
    ofi_close(t);
    return MC_ERR_TRANSPORT;
  }
  t->inject_size = t->info->tx_attr->inject_size;
  OFI_TRY(fi_fabric(t->info->fabric_attr, &t->fabric, NULL), "fi_fabric");
  OFI_TRY(fi_domain(t->fabric, t->info, &t->domain, NULL), "fi_domain");

  struct fi_cq_attr cq_attr = {.format = FI_CQ_FORMAT_TAGGED, .wait_obj = FI_WAIT_FD, .size = 0};
  if (fi_cq_open(t->domain, &cq_attr, &t->cq, NULL) == 0 &&
      fi_control(&t->cq->fid, FI_GETWAIT, &t->cq_fd) == 0) {
    /* blocking on the CQ's fd */
  } else {
    if (t->cq)
      fi_close(&t->cq->fid), t->cq = NULL;
    t->cq_fd = -1;
    cq_attr.wait_obj = FI_WAIT_NONE;
    OFI_TRY(fi_cq_open(t->domain, &cq_attr, &t->cq, NULL), "fi_cq_open");
    t->doorbell = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    struct sockaddr_un a;
    socklen_t len;
    doorbell_address(p->comm_id, p->rank, &a, &len);
    if (t->doorbell < 0 || bind(t->doorbell, (struct sockaddr *)&a, len)) {
      snprintf(err, errlen, "doorbell socket for provider %s: %s", prov, strerror(errno));
      ofi_close(t);
      return MC_ERR_TRANSPORT;
    }
  }
  struct fi_av_attr av_attr = {.type = FI_AV_TABLE};
  OFI_TRY(fi_av_open(t->domain, &av_attr, &t->av, NULL), "fi_av_open");
  /* several streams only where one connection per peer is the limit (not shm: one copy) */
  int64_t k = mc_param_int(MC_PARAM_OFI_STREAMS);
  t->nstreams = t->doorbell >= 0 || k < 1 ? 1 : k > MAX_STREAMS ? MAX_STREAMS : (int)k;
  t->stripe_min = (size_t)mc_param_int(MC_PARAM_OFI_STRIPE_BYTES);
  for (int i = 0; i < t->nstreams; i++) {
    OFI_TRY(fi_endpoint(t->domain, t->info, &t->eps[i], NULL), "fi_endpoint");
    OFI_TRY(fi_ep_bind(t->eps[i], &t->av->fid, 0), "fi_ep_bind(av)");
    OFI_TRY(fi_ep_bind(t->eps[i], &t->cq->fid, FI_TRANSMIT | FI_RECV), "fi_ep_bind(cq)");
    OFI_TRY(fi_enable(t->eps[i]), "fi_enable");
  }
  t->ep = t->eps[0];
  *out = t;
  return MC_OK;
}

static const char *ofi_provider(mc_transport_t *t) { return t->info->fabric_attr->prov_name; }

/* tcp and shm take any size; verbs and efa have a largest message (not split: a clear error) */
static bool too_large(mc_transport_t *t, size_t len) {
  size_t max = t->info->ep_attr->max_msg_size;
  if (len <= max)
    return false;
  snprintf(t->error, sizeof t->error, "a message of %zu bytes exceeds provider %s's largest (%zu)",
           len, ofi_provider(t), max);
  return true;
}

/* The address is the endpoints' names (one per stream, all the same length), the number of
 * streams (one byte) and the doorbell key, so that an endpoint opened before its rank in a
 * communicator is known (shrink's standby) is still addressable. */
static mc_status_t ofi_get_address(mc_transport_t *t, void *buf, size_t *len) {
  size_t used = 0, first = 0;
  if (*len < 1 + sizeof(int32_t))
    return MC_ERR_TRANSPORT;
  for (int i = 0; i < t->nstreams; i++) {
    size_t name_len = *len - 1 - sizeof(int32_t) - used;
    if (fi_getname(&t->eps[i]->fid, (char *)buf + used, &name_len) || (i && name_len != first))
      return MC_ERR_TRANSPORT;
    first = name_len;
    used += name_len;
  }
  ((unsigned char *)buf)[used++] = (unsigned char)t->nstreams;
  int32_t key = t->key;
  memcpy((char *)buf + used, &key, sizeof key);
  *len = used + sizeof key;
  return MC_OK;
}

static mc_status_t ofi_set_peers(mc_transport_t *t, void *const *addrs, const size_t *lens, int n) {
  /* again for a shrink's standby, connected ahead in its old order: the AV gives an address
   * already inserted its old fi_addr back, so rxm's connection to it is reused */
  free(t->peers), free(t->peer_streams), free(t->peer_keys);
  t->peers = calloc((size_t)n * t->nstreams, sizeof *t->peers);
  t->peer_streams = calloc(n, sizeof *t->peer_streams);
  t->peer_keys = calloc(n, sizeof *t->peer_keys);
  if (!t->peers || !t->peer_streams || !t->peer_keys)
    return MC_ERR_NOMEM;
  t->npeers = n;
  for (int r = 0; r < n; r++) {
    int32_t key;
    const char *a = addrs[r];
    if (lens[r] < 1 + sizeof key)
      return MC_ERR_TRANSPORT;
    memcpy(&key, a + lens[r] - sizeof key, sizeof key);
    t->peer_keys[r] = key;
    size_t names = lens[r] - 1 - sizeof key;
    int k = ((const unsigned char *)a)[names];
    if (k < 1 || names % k)
      return MC_ERR_TRANSPORT;
    t->peer_streams[r] = k < t->nstreams ? k : t->nstreams;
    for (int s = 0; s < t->peer_streams[r]; s++)
      if (fi_av_insert(t->av, a + s * (names / k), 1, &t->peers[r * t->nstreams + s], 0, NULL) != 1)
        return MC_ERR_TRANSPORT;
  }
  return MC_OK;
}

/* ---- striped transfers ---- */

struct piece {
  struct stripe *s;
  int idx;
  bool done;
};

struct stripe {
  struct stripe *next, *prev;
  mc_transport_ctx_t *ctx; /* the engine's transfer */
  bool is_send, reported, cancelled;
  int peer, npieces, posted, left; /* left: posted pieces not completed */
  char *buf;
  size_t len, chunk, got;
  uint64_t tag, data;
  mc_status_t status;
  struct piece piece[MAX_STREAMS];
};

#define CTX_STRIPE(ctx) ((ctx)->opaque[0])
/* a piece's libfabric context is its address + 1: engine contexts are aligned, so the low bit
 * tells the two apart in the CQ */
#define PIECE_CTX(p) ((void *)((char *)(p) + 1))
#define IS_PIECE(c) (((uintptr_t)(c)&1) != 0)

static bool stripes(const mc_transport_t *t, int peer, size_t len, uint64_t tag) {
  return t->nstreams > 1 && peer >= 0 && !(tag & TAG_P2P) && len >= t->stripe_min &&
         t->peer_streams[peer] > 1;
}

static void stripe_unlink(mc_transport_t *t, struct stripe *s) {
  if (s->prev)
    s->prev->next = s->next;
  else
    t->live = s->next;
  if (s->next)
    s->next->prev = s->prev;
  free(s);
}

static void stripes_free(mc_transport_t *t) {
  while (t->live)
    stripe_unlink(t, t->live);
  t->unposted = 0;
}

static ssize_t piece_post(mc_transport_t *t, struct stripe *s, int i) {
  size_t off = (size_t)i * s->chunk;
  size_t n = s->len - off < s->chunk ? s->len - off : s->chunk;
  fi_addr_t a = t->peers[s->peer * t->nstreams + i];
  uint64_t tag = s->tag | (uint64_t)i << TAG_PIECE_SHIFT;
  return s->is_send
             ? fi_tsenddata(t->eps[i], s->buf + off, n, NULL, s->data, a, tag,
                            PIECE_CTX(&s->piece[i]))
             : fi_trecv(t->eps[i], s->buf + off, n, NULL, a, tag, 0, PIECE_CTX(&s->piece[i]));
}

/* Hands the engine its transfer's completion (once). */
static void stripe_report(mc_transport_t *t, struct stripe *s) {
  if (s->reported)
    return;
  s->reported = true;
  if (t->nready == t->ready_cap) {
    int cap = t->ready_cap ? 2 * t->ready_cap : 16;
    mc_completion_t *r = realloc(t->ready, cap * sizeof *r);
    if (!r)
      abort(); /* a lost completion would hang the operation */
    t->ready = r, t->ready_cap = cap;
  }
  t->ready[t->nready++] = (mc_completion_t){.ctx = s->ctx,
                                            .status = s->status,
                                            .len = s->got,
                                            .tag = s->tag,
                                            .data = s->data,
                                            .error = s->status ? t->error : NULL};
}

/* Pieces not posted yet are dropped: they count as never sent. */
static void stripe_drop_unposted(mc_transport_t *t, struct stripe *s) {
  t->unposted -= s->npieces - s->posted;
  s->npieces = s->posted;
}

static void stripe_settle(mc_transport_t *t, struct stripe *s) {
  if (s->left == 0 && s->posted == s->npieces) {
    stripe_report(t, s);
    stripe_unlink(t, s);
  }
}

/* Posts what queue space allows; a hard error fails the transfer at once (the engine then
 * breaks the communicator and closes the transport, which ends the other pieces). */
static void stripe_post_more(mc_transport_t *t, struct stripe *s) {
  while (s->posted < s->npieces) {
    ssize_t rc = piece_post(t, s, s->posted);
    if (rc == -FI_EAGAIN || rc == -FI_ENOMEM)
      return;
    if (rc) {
      snprintf(t->error, sizeof t->error, "%s (stream %d): %s",
               s->is_send ? "fi_tsenddata" : "fi_trecv", s->posted, fi_strerror((int)-rc));
      s->status = MC_ERR_TRANSPORT;
      stripe_drop_unposted(t, s);
      stripe_report(t, s);
      break;
    }
    s->posted++, s->left++, t->unposted--;
  }
  stripe_settle(t, s);
}

static mc_status_t stripe_start(mc_transport_t *t, bool is_send, int peer, void *buf, size_t len,
                                uint64_t tag, uint64_t data, mc_transport_ctx_t *ctx) {
  int k = t->peer_streams[peer];
  size_t chunk = ((len + k - 1) / k + 63) & ~(size_t)63; /* both ends compute the same split */
  if (too_large(t, chunk))
    return MC_ERR_UNSUPPORTED;
  struct stripe *s = calloc(1, sizeof *s);
  if (!s) {
    snprintf(t->error, sizeof t->error, "out of memory");
    return MC_ERR_NOMEM;
  }
  *s = (struct stripe){.ctx = ctx,
                       .is_send = is_send,
                       .peer = peer,
                       .npieces = (int)((len + chunk - 1) / chunk),
                       .buf = buf,
                       .len = len,
                       .chunk = chunk,
                       .tag = tag,
                       .data = data};
  for (int i = 0; i < s->npieces; i++)
    s->piece[i] = (struct piece){.s = s, .idx = i};
  ssize_t rc = piece_post(t, s, 0);
  if (rc == -FI_EAGAIN || rc == -FI_ENOMEM) {
    free(s);
    return MC_ERR_TIMEOUT;
  }
  if (rc) {
    snprintf(t->error, sizeof t->error, "%s: %s", is_send ? "fi_tsenddata" : "fi_trecv",
             fi_strerror((int)-rc));
    free(s);
    return MC_ERR_TRANSPORT;
  }
  s->posted = s->left = 1;
  t->unposted += s->npieces - 1;
  s->next = t->live;
  if (t->live)
    t->live->prev = s;
  t->live = s;
  CTX_STRIPE(ctx) = s;
  stripe_post_more(t, s);
  return MC_OK;
}

static void stripe_cancel(mc_transport_t *t, struct stripe *s) {
  s->cancelled = true;
  stripe_drop_unposted(t, s);
  for (int i = 0; i < s->posted; i++)
    if (!s->piece[i].done)
      fi_cancel(&t->eps[i]->fid, PIECE_CTX(&s->piece[i]));
}

/* A piece finished (st != MC_OK: failed). A truncated piece (the ranks disagree on the size)
 * cancels the other receives so the transfer still completes, as a mismatch. */
static void piece_done(mc_transport_t *t, struct piece *p, mc_status_t st, size_t len,
                       uint64_t data, bool has_data) {
  struct stripe *s = p->s;
  p->done = true;
  s->left--;
  s->got += len;
  if (has_data && p->idx == 0)
    s->data = data;
  if (st != MC_OK && s->status == MC_OK) {
    s->status = st;
    if (st == MC_ERR_TRANSPORT && !s->cancelled)
      stripe_report(t, s); /* the engine breaks the communicator: close ends the rest */
    else if (!s->is_send && !s->cancelled)
      stripe_cancel(t, s); /* truncated or cancelled: end the other pieces, then report */
  }
  stripe_settle(t, s); /* a short piece shows as a short total: the engine's mismatch */
}

static int take_ready(mc_transport_t *t, mc_completion_t *out, int max) {
  int n = t->nready < max ? t->nready : max;
  memcpy(out, t->ready, n * sizeof *out);
  memmove(t->ready, t->ready + n, (t->nready - n) * sizeof *out);
  t->nready -= n;
  return n;
}

static void post_unposted(mc_transport_t *t) {
  for (struct stripe *s = t->live, *next; s && t->unposted > 0; s = next) {
    next = s->next;
    if (s->posted < s->npieces)
      stripe_post_more(t, s);
  }
}

static mc_status_t ofi_send(mc_transport_t *t, int peer, const void *buf, size_t len, uint64_t tag,
                            uint64_t data, mc_transport_ctx_t *ctx) {
  CTX_STRIPE(ctx) = NULL;
  if (stripes(t, peer, len, tag))
    return stripe_start(t, true, peer, (void *)buf, len, tag, data, ctx);
  if (too_large(t, len))
    return MC_ERR_UNSUPPORTED;
  ssize_t rc = fi_tsenddata(t->ep, buf, len, NULL, data, t->peers[peer * t->nstreams], tag, ctx);
  if (rc == -FI_EAGAIN || rc == -FI_ENOMEM) /* queue or shm entry pool full: retry later */
    return MC_ERR_TIMEOUT;
  if (rc) {
    snprintf(t->error, sizeof t->error, "fi_tsenddata: %s", fi_strerror((int)-rc));
    return MC_ERR_TRANSPORT;
  }
  ring(t, peer);
  return MC_OK;
}

/* The receive's peer is kept in the transport's part of the context: the sender is rung when
 * a large transfer from it completes. */
#define CTX_PEER(ctx) ((ctx)->opaque[7])

static mc_status_t ofi_recv(mc_transport_t *t, int peer, void *buf, size_t len, uint64_t tag,
                            mc_transport_ctx_t *ctx) {
  CTX_STRIPE(ctx) = NULL;
  if (stripes(t, peer, len, tag))
    return stripe_start(t, false, peer, buf, len, tag, 0, ctx);
  if (too_large(t, len))
    return MC_ERR_UNSUPPORTED;
  fi_addr_t src = peer < 0 ? FI_ADDR_UNSPEC : t->peers[peer * t->nstreams];
  CTX_PEER(ctx) = (void *)(intptr_t)peer;
  ssize_t rc = fi_trecv(t->ep, buf, len, NULL, src, tag, 0, ctx);
  if (rc == -FI_EAGAIN || rc == -FI_ENOMEM) /* queue or shm entry pool full: retry later */
    return MC_ERR_TIMEOUT;
  if (rc) {
    snprintf(t->error, sizeof t->error, "fi_trecv: %s", fi_strerror((int)-rc));
    return MC_ERR_TRANSPORT;
  }
  return MC_OK;
}

/* Rings the sender of a completed receive (any-source receives rely on the backstop). */
static void ring_sender(mc_transport_t *t, void *op_context) {
  if (t->doorbell >= 0)
    ring(t, (int)(intptr_t)CTX_PEER((mc_transport_ctx_t *)op_context));
}

static int cq_poll(mc_transport_t *t, mc_completion_t *out, int max) {
  struct fi_cq_tagged_entry e[32];
  if (max > 32)
    max = 32;
  ssize_t n = fi_cq_read(t->cq, e, max);
  if (n > 0) {
    for (ssize_t i = 0; i < n; i++) {
      out[i] = (mc_completion_t){.ctx = e[i].op_context,
                                 .status = MC_OK,
                                 .len = e[i].len,
                                 .tag = e[i].tag,
                                 .data = (e[i].flags & FI_REMOTE_CQ_DATA) ? e[i].data : 0};
      if ((e[i].flags & FI_RECV) && e[i].len > t->inject_size)
        ring_sender(t, e[i].op_context);
    }
    return (int)n;
  }
  if (n != -FI_EAVAIL)
    return 0;
  struct fi_cq_err_entry ee = {0};
  if (fi_cq_readerr(t->cq, &ee, 0) != 1)
    return 0;
  int err = ee.err < 0 ? -ee.err : ee.err; /* shm 1.17 reports some errors negated */
  mc_status_t st = err == FI_ETRUNC      ? MC_ERR_MISMATCH
                   : err == FI_ECANCELED ? MC_ERR_REVOKED
                                         : MC_ERR_TRANSPORT;
  snprintf(t->error, sizeof t->error, "%s (%s)", fi_strerror(err),
           fi_cq_strerror(t->cq, ee.prov_errno, ee.err_data, NULL, 0));
  out[0] = (mc_completion_t){.ctx = ee.op_context,
                             .status = st,
                             .len = ee.len,
                             .tag = ee.tag,
                             .data = (ee.flags & FI_REMOTE_CQ_DATA) ? ee.data : 0,
                             .error = t->error,
                             .overflow = st == MC_ERR_MISMATCH ? ee.olen : 0};
  if ((ee.flags & FI_RECV) && st == MC_ERR_MISMATCH)
    ring_sender(t, ee.op_context);
  return 1;
}

/* Completions for the engine: striped transfers' pieces are absorbed here. */
static int ofi_poll(mc_transport_t *t, mc_completion_t *out, int max) {
  if (!t->live && !t->nready)
    return cq_poll(t, out, max);
  if (t->unposted)
    post_unposted(t);
  for (;;) {
    int n = take_ready(t, out, max);
    if (n == max)
      return n;
    int m = cq_poll(t, out + n, max - n), kept = n;
    for (int i = n; i < n + m; i++) {
      if (IS_PIECE(out[i].ctx))
        piece_done(t, (struct piece *)((char *)out[i].ctx - 1), out[i].status, out[i].len,
                   out[i].data, out[i].status == MC_OK);
      else
        out[kept++] = out[i];
    }
    kept += take_ready(t, out + kept, max - kept);
    if (kept > 0 || m == 0)
      return kept;
  }
}

static void ofi_cancel(mc_transport_t *t, mc_transport_ctx_t *ctx) {
  struct stripe *s = CTX_STRIPE(ctx);
  if (s) {
    stripe_cancel(t, s);
    stripe_settle(t, s);
  } else
    fi_cancel(&t->ep->fid, ctx);
}

static bool ofi_prepare_sleep(mc_transport_t *t, int *fd, int *backstop_us) {
  if (t->unposted || t->nready)
    return false; /* pieces wait for queue space, or completions for poll */
  if (t->cq_fd >= 0) {
    struct fid *f = &t->cq->fid;
    *fd = t->cq_fd;
    /* rxm accepts connections in its progress, which the CQ fd does not signal */
    *backstop_us = (int)mc_param_int(MC_PARAM_BACKSTOP_US);
    return fi_trywait(t->fabric, &f, 1) == FI_SUCCESS;
  }
  *fd = t->doorbell;
  *backstop_us = (int)mc_param_int(MC_PARAM_BACKSTOP_US);
  return true;
}

static void ofi_after_sleep(mc_transport_t *t) {
  char buf[64];
  if (t->doorbell >= 0)
    while (recv(t->doorbell, buf, sizeof buf, MSG_DONTWAIT) > 0) {
    }
}

static const char *ofi_last_error(mc_transport_t *t) { return t->error; }

const mc_transport_ops_t mc_ofi_transport = {
    .name = "ofi",
    .open = ofi_open,
    .provider = ofi_provider,
    .get_address = ofi_get_address,
    .set_peers = ofi_set_peers,
    .send = ofi_send,
    .recv = ofi_recv,
    .poll = ofi_poll,
    .cancel = ofi_cancel,
    .prepare_sleep = ofi_prepare_sleep,
    .after_sleep = ofi_after_sleep,
    .last_error = ofi_last_error,
    .close = ofi_close,
};
