/* A persistent pool of POSIX threads for the runtime's kernels: one call splits into `parts`, the caller runs
 * part 0 and the workers the others, then the caller waits for all of them.
 *
 * Why not a thread per call: a decode step calls ~200 small GEMVs (tens of microseconds each), and
 * pthread_create + join costs about as much as one of them. Why not OpenMP: its idle workers spin for a long
 * time by default (GOMP_SPINCOUNT), burning the cores that the rest of the program (torch's own ops between
 * the linears) needs. Here an idle worker spins for at most QK_POOL_SPIN polls (a few microseconds, enough to
 * catch the next linear of the same step) and then sleeps on a condition variable; it costs nothing while the
 * process does other work.
 *
 * One call at a time: a second caller (another Python thread with the GIL released) that finds the pool busy
 * runs all its parts itself, so calls never wait on each other and never deadlock. */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>

#include "qk_kernels.h"

#ifndef QK_POOL_SPIN
#define QK_POOL_SPIN 2000  /* ~100 us of pause: the gap between two linears of a decode step */
#endif

static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER;  /* held by the caller for a whole call */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static pthread_cond_t done = PTHREAD_COND_INITIALIZER;
static int n_workers = 0;             /* started so far (they live until the process ends) */
static atomic_int go[QK_MAX_THREADS];  /* go[id] = 1: worker id runs part id + 1 of the current call */
static atomic_int pending;             /* parts the workers have not finished yet */
static qk_task_fn task_fn;
static void *task_ctx;
static int task_parts;

static inline void pause_once(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void *worker(void *arg) {
    int id = (int)(intptr_t)arg;
    for (;;) {
        int spins = 0;
        while (!atomic_load_explicit(&go[id], memory_order_acquire) && spins < QK_POOL_SPIN) {
            spins++;
            pause_once();
        }
        if (!atomic_load_explicit(&go[id], memory_order_acquire)) {
            pthread_mutex_lock(&lock);
            while (!atomic_load(&go[id])) pthread_cond_wait(&wake, &lock);
            pthread_mutex_unlock(&lock);
        }
        task_fn(task_ctx, id + 1, task_parts);
        atomic_store(&go[id], 0);
        if (atomic_fetch_sub(&pending, 1) == 1) {
            pthread_mutex_lock(&lock);
            pthread_cond_signal(&done);
            pthread_mutex_unlock(&lock);
        }
    }
    return NULL;
}

int qk_pool_threads(void) { return n_workers + 1; }

/* a forked child has none of the parent's threads: it starts its own pool */
static void after_fork_child(void) {
    pthread_mutex_init(&call_lock, NULL);
    pthread_mutex_init(&lock, NULL);
    pthread_cond_init(&wake, NULL);
    pthread_cond_init(&done, NULL);
    n_workers = 0;
    for (int w = 0; w < QK_MAX_THREADS; w++) atomic_store(&go[w], 0);
}

static pthread_once_t fork_once = PTHREAD_ONCE_INIT;
static void register_fork(void) { pthread_atfork(NULL, NULL, after_fork_child); }

int qk_parallel(qk_task_fn fn, void *ctx, int parts) {
    if (parts < 1 || parts > QK_MAX_THREADS) return QK_EARG;
    if (parts == 1 || pthread_mutex_trylock(&call_lock) != 0) {
        for (int p = 0; p < parts; p++) fn(ctx, p, parts);
        return QK_OK;
    }
    pthread_once(&fork_once, register_fork);
    while (n_workers < parts - 1) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&t, &attr, worker, (void *)(intptr_t)n_workers);
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        n_workers++;
    }
    int helpers = n_workers < parts - 1 ? n_workers : parts - 1;
    task_fn = fn;
    task_ctx = ctx;
    task_parts = parts;
    atomic_store(&pending, helpers);
    pthread_mutex_lock(&lock);
    for (int w = 0; w < helpers; w++) atomic_store_explicit(&go[w], 1, memory_order_release);
    pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&lock);
    fn(ctx, 0, parts);
    /* parts the pool could not start threads for (out of resources) run here */
    for (int p = helpers + 1; p < parts; p++) fn(ctx, p, parts);
    int spins = 0;
    while (atomic_load_explicit(&pending, memory_order_acquire) > 0 && spins < QK_POOL_SPIN) {
        spins++;
        pause_once();
    }
    if (atomic_load(&pending) > 0) {
        pthread_mutex_lock(&lock);
        while (atomic_load(&pending) > 0) pthread_cond_wait(&done, &lock);
        pthread_mutex_unlock(&lock);
    }
    pthread_mutex_unlock(&call_lock);
    return QK_OK;
}
