/* Collective algorithms, written as step generators for the scheduler (schedule.c):
 * mc_algo_next_step() fills the transfers of step req->step and returns false when done.
 *   allreduce  recursive doubling (small) or ring reduce-scatter + allgather (large)
 *   reduce_scatter  ring
 *   allgather  ring
 *   broadcast  binomial tree
 *   barrier    dissemination */
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "reduce.h"

enum { ALGO_TRIVIAL, ALGO_RD, ALGO_RING };

static int mod(int a, int n) { return ((a % n) + n) % n; }

/* Ring chunk i of count elements split n ways: the first count % n chunks get one more. */
static size_t chunk_count(size_t count, int n, int i) {
  return count / n + ((size_t)i < count % n);
}
static size_t chunk_offset(size_t count, int n, int i) {
  size_t base = count / n, extra = count % n;
  return (size_t)i * base + ((size_t)i < extra ? (size_t)i : extra);
}

static char *at(void *buf, size_t elems, mc_dtype_t t) {
  return (char *)buf + elems * mc_dtype_size(t);
}

void mc_algo_setup(mc_request_t *req) {
  mc_comm_t *comm = req->comm;
  const int n = comm->size;
  const size_t esz = mc_dtype_size(req->dtype), bytes = req->count * esz;
  req->algo = n == 1 ? ALGO_TRIVIAL : ALGO_RD;
  switch (req->kind) {
  case MC_OP_ALLREDUCE: {
    if (req->in != req->out && bytes)
      memcpy(req->out, req->in, bytes);
    if (n == 1)
      break;
    size_t tmp_bytes = bytes;
    if (bytes >= (size_t)mc_param_int(MC_PARAM_RING_MIN_BYTES) && req->count >= (size_t)n) {
      req->algo = ALGO_RING;
      tmp_bytes = chunk_count(req->count, n, 0) * esz;
    }
    if (tmp_bytes && !(req->tmp = malloc(tmp_bytes))) {
      mc_request_complete(req, MC_ERR_NOMEM, "rank %d: allreduce #%u: no memory for %zu bytes",
                          comm->rank, req->seq, tmp_bytes);
    }
    break;
  }
  case MC_OP_REDUCE_SCATTER: {
    if (n == 1) {
      if (bytes && req->in != req->out)
        memcpy(req->out, req->in, bytes);
      break;
    }
    if (bytes && !(req->tmp = malloc(bytes)))
      mc_request_complete(req, MC_ERR_NOMEM, "rank %d: reduce_scatter #%u: no memory for %zu bytes",
                          comm->rank, req->seq, bytes);
    break;
  }
  case MC_OP_ALLGATHER: {
    char *mine = at(req->out, req->count * comm->rank, req->dtype);
    if (req->in != mine && bytes)
      memcpy(mine, req->in, bytes);
    break;
  }
  default: break;
  }
}

static void finish_avg(mc_request_t *req, void *buf, size_t count) {
  if (req->redop == MC_AVG)
    mc_scale_div(buf, count, req->dtype, req->comm->size);
}

/* Recursive doubling; a non-power-of-two size first folds the extra ranks into their
 * neighbours and unfolds them at the end. */
static bool allreduce_rd(mc_request_t *req) {
  const int n = req->comm->size, r = req->comm->rank;
  int p = 1, levels = 0;
  while (p * 2 <= n)
    p *= 2, levels++;
  const int extra = n - p;
  const size_t bytes = req->count * mc_dtype_size(req->dtype);
  const int s = req->step;
  const bool folded_out = r < 2 * extra && r % 2 == 0; /* sits out the doubling */
  if (s == 0) {
    if (r < 2 * extra) {
      if (folded_out) {
        mc_step_add(req, true, r + 1, req->out, bytes);
      } else {
        mc_step_add(req, false, r - 1, req->tmp, bytes);
        req->red_dst = req->out, req->red_src = req->tmp, req->red_count = req->count;
      }
    }
    return true;
  }
  if (s <= levels) {
    if (folded_out)
      return true;
    int vr = r < 2 * extra ? r / 2 : r - extra;
    int vpartner = vr ^ (1 << (s - 1));
    int partner = vpartner < extra ? vpartner * 2 + 1 : vpartner + extra;
    mc_step_add(req, true, partner, req->out, bytes);
    mc_step_add(req, false, partner, req->tmp, bytes);
    req->red_dst = req->out, req->red_src = req->tmp, req->red_count = req->count;
    return true;
  }
  if (s == levels + 1) {
    if (r < 2 * extra) {
      if (folded_out)
        mc_step_add(req, false, r + 1, req->out, bytes);
      else
        mc_step_add(req, true, r - 1, req->out, bytes);
    }
    return true;
  }
  finish_avg(req, req->out, req->count);
  return false;
}

/* Ring: n-1 reduce-scatter steps, then n-1 allgather steps. Rank r ends the first phase
 * owning chunk r+1, which it averages before passing it on. */
static bool allreduce_ring(mc_request_t *req) {
  const int n = req->comm->size, r = req->comm->rank, s = req->step;
  const int right = mod(r + 1, n), left = mod(r - 1, n);
  const size_t esz = mc_dtype_size(req->dtype), count = req->count;
  if (s >= 2 * n - 2)
    return false;
  if (s == n - 1) {
    int own = mod(r + 1, n);
    finish_avg(req, at(req->out, chunk_offset(count, n, own), req->dtype),
               chunk_count(count, n, own));
  }
  if (s < n - 1) {
    int send = mod(r - s, n), recv = mod(r - s - 1, n);
    mc_step_add(req, true, right, at(req->out, chunk_offset(count, n, send), req->dtype),
                chunk_count(count, n, send) * esz);
    mc_step_add(req, false, left, req->tmp, chunk_count(count, n, recv) * esz);
    req->red_dst = at(req->out, chunk_offset(count, n, recv), req->dtype);
    req->red_src = req->tmp;
    req->red_count = chunk_count(count, n, recv);
  } else {
    int k = s - (n - 1), send = mod(r + 1 - k, n), recv = mod(r - k, n);
    mc_step_add(req, true, right, at(req->out, chunk_offset(count, n, send), req->dtype),
                chunk_count(count, n, send) * esz);
    mc_step_add(req, false, left, at(req->out, chunk_offset(count, n, recv), req->dtype),
                chunk_count(count, n, recv) * esz);
  }
  return true;
}

/* Ring reduce-scatter: at step k rank r passes on its partial of block r-k-1 and receives
 * the partial of block r-k-2, which it adds to its own input block in `out`. After n-1 steps
 * `out` holds block r reduced over all ranks. Each rank sends (n-1) blocks in all. */
static bool reduce_scatter_ring(mc_request_t *req) {
  const int n = req->comm->size, r = req->comm->rank, s = req->step;
  const size_t count = req->count, bytes = count * mc_dtype_size(req->dtype);
  if (s >= n - 1) {
    finish_avg(req, req->out, count);
    return false;
  }
  int send = mod(r - s - 1, n), recv = mod(r - s - 2, n);
  const void *src = s == 0 ? at((void *)req->in, count * send, req->dtype) : req->out;
  mc_step_add(req, true, mod(r + 1, n), (void *)src, bytes);
  mc_step_add(req, false, mod(r - 1, n), req->tmp, bytes);
  req->red_base = at((void *)req->in, count * recv, req->dtype);
  req->red_dst = req->out, req->red_src = req->tmp, req->red_count = count;
  return true;
}

static bool allgather_ring(mc_request_t *req) {
  const int n = req->comm->size, r = req->comm->rank, s = req->step;
  const size_t bytes = req->count * mc_dtype_size(req->dtype);
  if (s >= n - 1)
    return false;
  int send = mod(r - s, n), recv = mod(r - s - 1, n);
  mc_step_add(req, true, mod(r + 1, n), at(req->out, req->count * send, req->dtype), bytes);
  mc_step_add(req, false, mod(r - 1, n), at(req->out, req->count * recv, req->dtype), bytes);
  return true;
}

/* Binomial tree rooted at root: step 0 receives from the parent, step 1 sends to all
 * children at once. Each link carries one message, tagged as step 0 at both ends. */
static bool broadcast_binomial(mc_request_t *req) {
  const int n = req->comm->size, r = req->comm->rank;
  const int vr = mod(r - req->root, n);
  const size_t bytes = req->count * mc_dtype_size(req->dtype);
  int mask = 1;
  while (mask < n && !(vr & mask))
    mask <<= 1; /* lowest set bit = link to the parent */
  if (req->step == 0) {
    if (vr)
      mc_step_add(req, false, mod(vr - mask + req->root, n), req->out, bytes);
    return true;
  }
  if (req->step == 1) {
    for (mask >>= 1; mask > 0; mask >>= 1)
      if (vr + mask < n)
        mc_step_add(req, true, mod(vr + mask + req->root, n), req->out, bytes);
    for (int i = 0; i < req->nxfers; i++)
      req->xfers[i].wire_step = 0;
    return true;
  }
  return false;
}

static bool barrier_dissemination(mc_request_t *req) {
  const int n = req->comm->size, r = req->comm->rank;
  if (req->step >= 31 || (1 << req->step) >= n)
    return false;
  int dist = 1 << req->step;
  mc_step_add(req, true, mod(r + dist, n), NULL, 0);
  mc_step_add(req, false, mod(r - dist, n), NULL, 0);
  return true;
}

/* Step k greets lower ranks (and hears from higher ones) in [32k, 32k + 32). Each pair
 * exchanges one message, tagged as step 0 at both ends. */
static bool connect_lower_first(mc_request_t *req) {
  const int n = req->comm->size, r = req->comm->rank, first = req->step * 32;
  if (first >= n)
    return false;
  for (int peer = first; peer < first + 32 && peer < n; peer++)
    if (peer != r)
      mc_step_add(req, peer < r, peer, NULL, 0);
  for (int i = 0; i < req->nxfers; i++)
    req->xfers[i].wire_step = 0;
  return true;
}

bool mc_algo_next_step(mc_request_t *req) {
  const size_t bytes = req->count * mc_dtype_size(req->dtype);
  switch (req->kind) {
  case MC_OP_ALLREDUCE:
    if (req->algo == ALGO_TRIVIAL)
      return false;
    return req->algo == ALGO_RING ? allreduce_ring(req) : allreduce_rd(req);
  case MC_OP_ALLGATHER: return req->algo != ALGO_TRIVIAL && allgather_ring(req);
  case MC_OP_REDUCE_SCATTER: return req->algo != ALGO_TRIVIAL && reduce_scatter_ring(req);
  case MC_OP_BROADCAST: return req->algo != ALGO_TRIVIAL && broadcast_binomial(req);
  case MC_OP_BARRIER: return req->algo != ALGO_TRIVIAL && barrier_dissemination(req);
  case MC_OP_CONNECT: return connect_lower_first(req);
  case MC_OP_SEND:
    if (req->step)
      return false;
    mc_step_add(req, true, req->peer, (void *)req->in, bytes);
    return true;
  case MC_OP_RECV:
    if (req->step)
      return false;
    mc_step_add(req, false, req->peer, req->out, bytes);
    return true;
  }
  return false;
}
