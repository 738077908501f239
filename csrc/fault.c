#include "fault.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "log.h"

#define MAX_RULES 16

typedef struct {
  char text[160];
  int rank;    /* -1: any */
  char op[32]; /* "": any */
  int64_t seq; /* -1: any */
  char phase[16];
  char action[16];
  int delay_ms;
  atomic_bool fired;
} rule_t;

static rule_t rules[MAX_RULES];
static int nrules;
static atomic_int my_rank = -1; /* learnt at the first fault point */
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void report_unfired(void) {
  for (int i = 0; i < nrules; i++)
    if (!atomic_load(&rules[i].fired) && (rules[i].rank < 0 || rules[i].rank == my_rank))
      fprintf(stderr, "mooncake: MC_FAULT rule never fired here: %s\n", rules[i].text);
}

static void parse(void) {
  const char *env = getenv("MC_FAULT");
  if (!env || !*env)
    return;
  char *copy = strdup(env), *save = NULL;
  if (!copy)
    return;
  for (char *r = strtok_r(copy, ";", &save); r && nrules < MAX_RULES;
       r = strtok_r(NULL, ";", &save)) {
    rule_t *rule = &rules[nrules];
    snprintf(rule->text, sizeof rule->text, "%s", r);
    rule->rank = -1, rule->seq = -1;
    snprintf(rule->action, sizeof rule->action, "kill");
    char *fsave = NULL;
    for (char *f = strtok_r(r, ",", &fsave); f; f = strtok_r(NULL, ",", &fsave)) {
      char *eq = strchr(f, '=');
      if (!eq)
        continue;
      *eq++ = 0;
      if (!strcmp(f, "rank"))
        rule->rank = atoi(eq);
      else if (!strcmp(f, "op"))
        snprintf(rule->op, sizeof rule->op, "%s", eq);
      else if (!strcmp(f, "seq"))
        rule->seq = atoll(eq);
      else if (!strcmp(f, "phase"))
        snprintf(rule->phase, sizeof rule->phase, "%s", eq);
      else if (!strcmp(f, "action")) {
        snprintf(rule->action, sizeof rule->action, "%s", eq);
        char *colon = strchr(rule->action, ':');
        if (colon)
          *colon = 0, rule->delay_ms = atoi(colon + 1);
      }
    }
    nrules++;
  }
  free(copy);
  if (nrules) /* a rule aimed at this rank that never fired means the test did not test it */
    atexit(report_unfired);
}

static bool matches(const rule_t *r, int rank, const char *op, int64_t seq, const char *phase) {
  return (r->rank < 0 || r->rank == rank) && (!*r->op || !strcmp(r->op, op)) &&
         (r->seq < 0 || r->seq == seq) && (!*r->phase || !strcmp(r->phase, phase));
}

bool mc_fault_point(int rank, const char *op, int64_t seq, const char *phase) {
  pthread_once(&once, parse);
  atomic_store(&my_rank, rank);
  for (int i = 0; i < nrules; i++) {
    rule_t *r = &rules[i];
    if (atomic_load(&r->fired) || !matches(r, rank, op, seq, phase) ||
        atomic_exchange(&r->fired, true))
      continue;
    /* the time (CLOCK_MONOTONIC, Python's time.monotonic()) lets the harness measure detection */
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    fprintf(stderr, "mooncake: rank %d: MC_FAULT fired: %s (at monotonic %lld.%06ld)\n", rank,
            r->text, (long long)now.tv_sec, now.tv_nsec / 1000);
    fflush(stderr);
    if (!strcmp(r->action, "kill"))
      kill(getpid(), SIGKILL);
    else if (!strcmp(r->action, "stop"))
      kill(getpid(), SIGSTOP);
    else if (!strcmp(r->action, "exit"))
      _exit(3);
    else if (!strcmp(r->action, "delay")) {
      struct timespec ts = {r->delay_ms / 1000, (long)(r->delay_ms % 1000) * 1000000};
      nanosleep(&ts, NULL);
    } else if (!strcmp(r->action, "error"))
      return true;
  }
  return false;
}
