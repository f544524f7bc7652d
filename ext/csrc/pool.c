/* A persistent pool of POSIX threads for the runtime's kernels: one call splits into `parts`, the caller runs
 * part 0 and the workers the others, then the caller waits for all of them.
 *
 * Why not a thread per call: a decode step calls ~200 small GEMVs (tens of microseconds each), and
 * pthread_create + join costs about as much as one of them. Why not OpenMP: its idle workers spin for a long
 * time by default (GOMP_SPINCOUNT), burning the cores that the rest of the program (torch's own ops between
 * the linears) needs. Here an idle worker spins for at most the pool's spin time and then sleeps on a
 * condition variable, costing nothing while the process does other work. The spin time is a setting
 * (qk_pool_set_spin_us; llama.cpp's --poll is the same trade): it should cover the gap between two linears of
 * a decode step, which is torch's attention and norms on the caller's thread. Measured (SmolLM2-135M W4, 2
 * threads, 2 cores, 512-token prompt): 100 us of spin 34 tok/s, 250 us 40, 500 us 47, 2.5 ms 53 (1 thread:
 * 41); a sleeping worker's wake-up is what the short spins pay.
 *
 * One call at a time: a second caller (another Python thread with the GIL released) that finds the pool busy
 * runs all its parts itself, so calls never wait on each other and never deadlock. */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>

#include "qk_kernels.h"

#include <time.h>

static atomic_long spin_ns = 2000000;  /* 2 ms: see the note above */

void qk_pool_set_spin_us(long us) { atomic_store(&spin_ns, us < 0 ? 0 : us * 1000); }
long qk_pool_spin_us(void) { return atomic_load(&spin_ns) / 1000; }

static inline void pause_once(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static inline long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long)ts.tv_sec * 1000000000L + ts.tv_nsec;
}

/* spin until *flag != 0 (want_zero = 0) or *flag == 0 (want_zero = 1), for at most the spin time;
 * 1 when the wait ended by itself */
static int spin_wait(atomic_int *flag, int want_zero) {
    long limit = atomic_load_explicit(&spin_ns, memory_order_relaxed), t0 = 0;
    for (unsigned i = 0;; i++) {
        int v = atomic_load_explicit(flag, memory_order_acquire);
        if (want_zero ? v <= 0 : v != 0) return 1;
        if ((i & 63) == 0) {  /* the clock every 64 polls: a poll is a pause, ~40 ns */
            long t = now_ns();
            if (i == 0) t0 = t;
            else if (t - t0 >= limit) return 0;
        }
        pause_once();
    }
}

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


static void *worker(void *arg) {
    int id = (int)(intptr_t)arg;
    for (;;) {
        if (!spin_wait(&go[id], 0)) {
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
    if (!spin_wait(&pending, 1)) {
        pthread_mutex_lock(&lock);
        while (atomic_load(&pending) > 0) pthread_cond_wait(&done, &lock);
        pthread_mutex_unlock(&lock);
    }
    pthread_mutex_unlock(&call_lock);
    return QK_OK;
}
