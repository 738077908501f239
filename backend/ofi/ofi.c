/* libfabric RDM transport: tagged messages with 8 bytes of remote CQ data, one endpoint per
 * communicator, peers addressed by rank through an AV table.
 *
 * Waking up: providers whose CQ offers a wait fd (tcp;ofi_rxm) are slept on directly. The shm
 * provider has none, and its receiver must run for a sender's large (CMA) transfer to finish,
 * so each rank also owns a "doorbell" datagram socket: a sender rings the receiver after
 * posting, and a receiver rings the sender after a transfer larger than the inject size. */
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

struct mc_transport {
  struct fi_info *info;
  struct fid_fabric *fabric;
  struct fid_domain *domain;
  struct fid_av *av;
  struct fid_cq *cq;
  struct fid_ep *ep;
  fi_addr_t *peers;
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

static void ofi_close(mc_transport_t *t) {
  if (!t)
    return;
  if (t->ep)
    fi_close(&t->ep->fid);
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
  free(t->peer_keys);
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
  OFI_TRY(fi_endpoint(t->domain, t->info, &t->ep, NULL), "fi_endpoint");
  OFI_TRY(fi_ep_bind(t->ep, &t->av->fid, 0), "fi_ep_bind(av)");
  OFI_TRY(fi_ep_bind(t->ep, &t->cq->fid, FI_TRANSMIT | FI_RECV), "fi_ep_bind(cq)");
  OFI_TRY(fi_enable(t->ep), "fi_enable");
  *out = t;
  return MC_OK;
}

static const char *ofi_provider(mc_transport_t *t) { return t->info->fabric_attr->prov_name; }

/* The address is the endpoint name followed by the doorbell key, so that an endpoint opened
 * before its rank in a communicator is known (shrink's standby) is still addressable. */
static mc_status_t ofi_get_address(mc_transport_t *t, void *buf, size_t *len) {
  size_t name_len = *len - sizeof(int32_t);
  if (*len < sizeof(int32_t) || fi_getname(&t->ep->fid, buf, &name_len))
    return MC_ERR_TRANSPORT;
  int32_t key = t->key;
  memcpy((char *)buf + name_len, &key, sizeof key);
  *len = name_len + sizeof key;
  return MC_OK;
}

static mc_status_t ofi_set_peers(mc_transport_t *t, void *const *addrs, const size_t *lens, int n) {
  /* again for a shrink's standby, connected ahead in its old order: the AV gives an address
   * already inserted its old fi_addr back, so rxm's connection to it is reused */
  free(t->peers), free(t->peer_keys);
  t->peers = calloc(n, sizeof *t->peers);
  t->peer_keys = calloc(n, sizeof *t->peer_keys);
  if (!t->peers || !t->peer_keys)
    return MC_ERR_NOMEM;
  t->npeers = n;
  for (int r = 0; r < n; r++) {
    int32_t key;
    if (lens[r] < sizeof key)
      return MC_ERR_TRANSPORT;
    memcpy(&key, (const char *)addrs[r] + lens[r] - sizeof key, sizeof key);
    t->peer_keys[r] = key;
    if (fi_av_insert(t->av, addrs[r], 1, &t->peers[r], 0, NULL) != 1)
      return MC_ERR_TRANSPORT;
  }
  return MC_OK;
}

static mc_status_t ofi_send(mc_transport_t *t, int peer, const void *buf, size_t len, uint64_t tag,
                            uint64_t data, mc_transport_ctx_t *ctx) {
  ssize_t rc = fi_tsenddata(t->ep, buf, len, NULL, data, t->peers[peer], tag, ctx);
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
  fi_addr_t src = peer < 0 ? FI_ADDR_UNSPEC : t->peers[peer];
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

static int ofi_poll(mc_transport_t *t, mc_completion_t *out, int max) {
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

static void ofi_cancel(mc_transport_t *t, mc_transport_ctx_t *ctx) { fi_cancel(&t->ep->fid, ctx); }

static bool ofi_prepare_sleep(mc_transport_t *t, int *fd, int *backstop_us) {
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
