/* Which algorithm runs an operation: by kind, size, world size and locality, unless MC_ALGO
 * says otherwise. Every rank computes the same choice from the same arguments.
 *
 * MC_ALGO is a comma-separated list of rules "op[:min-max]=algo"; the first rule that matches
 * the operation and its size wins, e.g. "allreduce:0-64K=rd,allreduce=ring,allgather=ring".
 * The size is the operation's count times the element size (for allgather and reduce_scatter
 * one rank's block), K/M/G suffixes allowed, max exclusive, either end may be left open. */
#include <ctype.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "shm.h"

static const struct {
  const char *name;
  mc_algo_t algo;
} algo_names[] = {
    {"rd", MC_ALGO_RD},
    {"ring", MC_ALGO_RING},
    {"binomial", MC_ALGO_BINOMIAL},
    {"dissemination", MC_ALGO_DISSEMINATION},
    {"pairwise", MC_ALGO_PAIRWISE},
    {"shm", MC_ALGO_SHM},
    {"shm_flat", MC_ALGO_SHM_FLAT},
    {"shm_two_phase", MC_ALGO_SHM_TWO_PHASE},
    {"shm_slots", MC_ALGO_SHM_SLOTS},
    {"shm_cma", MC_ALGO_SHM_CMA},
    {"hier", MC_ALGO_HIER},
};

bool mc_algo_is_shm(mc_algo_t a) {
  return a == MC_ALGO_SHM || a == MC_ALGO_SHM_FLAT || a == MC_ALGO_SHM_TWO_PHASE ||
         a == MC_ALGO_SHM_SLOTS || a == MC_ALGO_SHM_CMA;
}

/* the algorithms each kind has */
static bool offers(mc_op_kind_t kind, mc_algo_t a) {
  if (a == MC_ALGO_SHM || a == MC_ALGO_SHM_SLOTS || a == MC_ALGO_SHM_CMA)
    return kind != MC_OP_BARRIER || a == MC_ALGO_SHM; /* every kind the shm path runs */
  switch (kind) {
  case MC_OP_ALLREDUCE:
    return a == MC_ALGO_SHM_FLAT || a == MC_ALGO_SHM_TWO_PHASE || a == MC_ALGO_RD ||
           a == MC_ALGO_RING || a == MC_ALGO_HIER;
  case MC_OP_REDUCE_SCATTER:
  case MC_OP_ALLGATHER: return a == MC_ALGO_SHM || a == MC_ALGO_RING || a == MC_ALGO_HIER;
  case MC_OP_BROADCAST: return a == MC_ALGO_SHM || a == MC_ALGO_BINOMIAL || a == MC_ALGO_HIER;
  case MC_OP_BARRIER: return a == MC_ALGO_SHM || a == MC_ALGO_DISSEMINATION || a == MC_ALGO_HIER;
  case MC_OP_REDUCE: return a == MC_ALGO_SHM || a == MC_ALGO_BINOMIAL || a == MC_ALGO_RING;
  case MC_OP_GATHER:
  case MC_OP_SCATTER: return a == MC_ALGO_SHM || a == MC_ALGO_BINOMIAL;
  case MC_OP_ALLTOALL: return a == MC_ALGO_SHM || a == MC_ALGO_PAIRWISE;
  default: return false;
  }
}

static const mc_op_kind_t rule_ops[] = {MC_OP_ALLREDUCE, MC_OP_REDUCE_SCATTER, MC_OP_ALLGATHER,
                                        MC_OP_BROADCAST, MC_OP_BARRIER,        MC_OP_REDUCE,
                                        MC_OP_GATHER,    MC_OP_SCATTER,        MC_OP_ALLTOALL};

typedef struct {
  mc_op_kind_t kind;
  size_t min, max; /* [min, max) bytes */
  mc_algo_t algo;
} rule_t;

#define MAX_RULES 32
static rule_t rules[MAX_RULES];
static int nrules;
static char parse_error[200];
static pthread_once_t parse_once = PTHREAD_ONCE_INIT;

static bool parse_size(const char *s, const char *end, size_t *out) {
  char *stop;
  unsigned long long v = strtoull(s, &stop, 10);
  if (stop == s)
    return false;
  if (stop < end) {
    int c = toupper((unsigned char)*stop++);
    int shift = c == 'K' ? 10 : c == 'M' ? 20 : c == 'G' ? 30 : -1;
    if (shift < 0)
      return false;
    v <<= shift;
  }
  *out = (size_t)v;
  return stop == end;
}

static bool parse_rule(const char *s, size_t len, rule_t *r) {
  char text[128];
  if (len >= sizeof text)
    return false;
  memcpy(text, s, len);
  text[len] = 0;
  char *eq = strchr(text, '=');
  if (!eq)
    return false;
  *eq = 0;
  char *range = strchr(text, ':');
  if (range)
    *range++ = 0;
  bool known = false;
  for (size_t i = 0; i < sizeof rule_ops / sizeof *rule_ops; i++)
    if (!strcmp(text, mc_op_name(rule_ops[i])))
      r->kind = rule_ops[i], known = true;
  if (!known)
    return false;
  r->min = 0, r->max = SIZE_MAX;
  if (range) {
    char *dash = strchr(range, '-');
    if (!dash)
      return false;
    if (dash > range && !parse_size(range, dash, &r->min))
      return false;
    if (dash[1] && !parse_size(dash + 1, dash + 1 + strlen(dash + 1), &r->max))
      return false;
  }
  for (size_t i = 0; i < sizeof algo_names / sizeof *algo_names; i++)
    if (!strcmp(eq + 1, algo_names[i].name) && offers(r->kind, algo_names[i].algo)) {
      r->algo = algo_names[i].algo;
      return true;
    }
  return false;
}

static void parse(void) {
  const char *s = mc_param_str(MC_PARAM_ALGO);
  while (*s) {
    size_t len = strcspn(s, ",");
    if (len && nrules < MAX_RULES && !parse_rule(s, len, &rules[nrules++])) {
      snprintf(parse_error, sizeof parse_error,
               "MC_ALGO: cannot use rule '%.*s' (op[:min-max]=algo; see docs/parameters.md)",
               (int)len, s);
      nrules = 0;
      return;
    }
    s += len + (s[len] == ',');
  }
}

const char *mc_algo_config_error(void) {
  pthread_once(&parse_once, parse);
  return parse_error[0] ? parse_error : NULL;
}

static size_t rule_bytes(const mc_request_t *req) { return req->count * mc_dtype_size(req->dtype); }

mc_algo_t mc_algo_choose(const mc_request_t *req) {
  const mc_comm_t *comm = req->comm;
  if (req->grp_n == 1)
    return MC_ALGO_TRIVIAL;
  pthread_once(&parse_once, parse);
  size_t bytes = rule_bytes(req);
  bool can_shm = comm->all_local && comm->shm && mc_shm_supports(req->kind);
  /* a hierarchical operation's stages are requests of their own: they never nest */
  bool can_hier =
      comm->hier && !req->grp_ranks &&
      (req->kind == MC_OP_ALLREDUCE || req->kind == MC_OP_BROADCAST || req->kind == MC_OP_BARRIER ||
       req->kind == MC_OP_ALLGATHER || req->kind == MC_OP_REDUCE_SCATTER);
  for (int i = 0; i < nrules; i++) {
    const rule_t *r = &rules[i];
    if (r->kind != req->kind || bytes < r->min || bytes >= r->max)
      continue;
    if (mc_algo_is_shm(r->algo) && !can_shm)
      break; /* not on one host: the default below */
    if (r->algo == MC_ALGO_HIER && !can_hier)
      break;
    if (r->algo == MC_ALGO_RING && req->count < (size_t)req->grp_n &&
        (req->kind == MC_OP_ALLREDUCE || req->kind == MC_OP_REDUCE))
      break; /* fewer elements than ranks: the ring has no chunks to pass around */
    return r->algo;
  }
  if (can_shm)
    return MC_ALGO_SHM;
  /* broadcast: only when asked; by default its binomial tree sends to the other hosts at once,
   * where the hierarchical one first waits for the root's host (docs/performance.md) */
  if (can_hier && req->kind != MC_OP_BROADCAST)
    return MC_ALGO_HIER;
  bool large =
      bytes >= (size_t)mc_param_int(MC_PARAM_RING_MIN_BYTES) && req->count >= (size_t)req->grp_n;
  switch (req->kind) {
  case MC_OP_ALLREDUCE: return large ? MC_ALGO_RING : MC_ALGO_RD;
  case MC_OP_REDUCE: return large ? MC_ALGO_RING : MC_ALGO_BINOMIAL;
  default: return MC_ALGO_DEFAULT;
  }
}
