/* MC_* parameters: one table, read from the environment once. */
#ifndef MOONCAKE_PARAM_H
#define MOONCAKE_PARAM_H

#include <stdint.h>

typedef enum {
  MC_PARAM_LOG_LEVEL,
  MC_PARAM_TRANSPORT,
  MC_PARAM_TIMEOUT_MS,
  MC_PARAM_SPIN_US,
  MC_PARAM_BACKSTOP_US,
  MC_PARAM_RING_MIN_BYTES,
  MC_PARAM_OFI_IFACE,
  MC_PARAM_HEARTBEAT_MS,
  MC_PARAM_FAILURE_TIMEOUT_MS,
  MC_PARAM_SHM,
  MC_PARAM_SHM_SLOT_BYTES,
  MC_PARAM_SHM_FLAT_MAX,
  MC_PARAM_SHM_CMA_MIN,
  MC_PARAM_ALGO,
  MC_PARAM_HIER_SEGMENT_BYTES,
  MC_PARAM_OFI_STREAMS,
  MC_PARAM_OFI_STRIPE_BYTES,
  MC_PARAM_COUNT
} mc_param_id_t;

int64_t mc_param_int(mc_param_id_t id);
const char *mc_param_str(mc_param_id_t id); /* "" when unset and no default */

#endif
