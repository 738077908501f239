#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "param.h"

int mc_log_level_current = -1;

static const char *level_names[] = {"error", "warn", "info", "debug", "trace"};

int mc_log_level(void) {
  if (mc_log_level_current < 0) {
    const char *want = mc_param_str(MC_PARAM_LOG_LEVEL);
    int level = MC_LOG_WARN;
    for (int i = 0; i <= MC_LOG_TRACE; i++)
      if (!strcasecmp(want, level_names[i]))
        level = i;
    mc_log_level_current = level;
  }
  return mc_log_level_current;
}

void mc_log_write(mc_log_level_t level, int rank, const char *fmt, ...) {
  char line[1024];
  int n = snprintf(line, sizeof line, "mooncake[rank %d pid %d] %s: ", rank, (int)getpid(),
                   level_names[level]);
  va_list ap;
  va_start(ap, fmt);
  if (n >= 0 && n < (int)sizeof line)
    vsnprintf(line + n, sizeof line - n, fmt, ap);
  va_end(ap);
  fprintf(stderr, "%s\n", line); /* one call: lines from threads don't interleave */
}
