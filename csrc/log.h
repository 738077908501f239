/* Levelled logging to stderr (MC_LOG_LEVEL=error|warn|info|debug|trace). */
#ifndef MOONCAKE_LOG_H
#define MOONCAKE_LOG_H

typedef enum { MC_LOG_ERROR, MC_LOG_WARN, MC_LOG_INFO, MC_LOG_DEBUG, MC_LOG_TRACE } mc_log_level_t;

extern int mc_log_level_current; /* -1 until first use */
int mc_log_level(void);
void mc_log_write(mc_log_level_t level, int rank, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define MC_LOG(level, rank, ...)                                                                   \
  do {                                                                                             \
    if ((int)(level) <= mc_log_level())                                                            \
      mc_log_write(level, rank, __VA_ARGS__);                                                      \
  } while (0)

#endif
