#include "param.h"

#include <pthread.h>
#include <stdlib.h>

typedef struct {
  const char *name;
  const char *fallback;
  const char *value; /* resolved once */
} mc_param_t;

/* The documented list lives in docs/parameters.md; keep the two in step. */
static mc_param_t params[MC_PARAM_COUNT] = {
    [MC_PARAM_LOG_LEVEL] = {"MC_LOG_LEVEL", "warn", 0},
    [MC_PARAM_TRANSPORT] = {"MC_TRANSPORT", "auto", 0},
    [MC_PARAM_TIMEOUT_MS] = {"MC_TIMEOUT_MS", "300000", 0},
    [MC_PARAM_SPIN_US] = {"MC_SPIN_US", "200", 0},
    [MC_PARAM_BACKSTOP_US] = {"MC_BACKSTOP_US", "1000", 0},
    [MC_PARAM_RING_MIN_BYTES] = {"MC_RING_MIN_BYTES", "65536", 0},
    [MC_PARAM_OFI_IFACE] = {"MC_OFI_IFACE", "", 0},
    [MC_PARAM_HEARTBEAT_MS] = {"MC_HEARTBEAT_MS", "50", 0},
    [MC_PARAM_FAILURE_TIMEOUT_MS] = {"MC_FAILURE_TIMEOUT_MS", "300", 0},
    [MC_PARAM_SHM] = {"MC_SHM", "1", 0},
    [MC_PARAM_SHM_SLOT_BYTES] = {"MC_SHM_SLOT_BYTES", "1048576", 0},
    [MC_PARAM_SHM_FLAT_MAX] = {"MC_SHM_FLAT_MAX", "65536", 0},
    [MC_PARAM_SHM_CMA_MIN] = {"MC_SHM_CMA_MIN", "auto", 0},
    [MC_PARAM_ALGO] = {"MC_ALGO", "", 0},
    [MC_PARAM_HIER_SEGMENT_BYTES] = {"MC_HIER_SEGMENT_BYTES", "1048576", 0},
    [MC_PARAM_OFI_STREAMS] = {"MC_OFI_STREAMS", "1", 0},
    [MC_PARAM_OFI_STRIPE_BYTES] = {"MC_OFI_STRIPE_BYTES", "262144", 0},
};

static pthread_once_t params_once = PTHREAD_ONCE_INIT;

static void params_read(void) {
  for (int i = 0; i < MC_PARAM_COUNT; i++) {
    const char *env = getenv(params[i].name);
    params[i].value = env && *env ? env : params[i].fallback;
  }
}

const char *mc_param_str(mc_param_id_t id) {
  pthread_once(&params_once, params_read);
  return params[id].value;
}

int64_t mc_param_int(mc_param_id_t id) { return strtoll(mc_param_str(id), NULL, 10); }
