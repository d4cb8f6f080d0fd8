/* Persistent thread pool: workers spin briefly on a job counter, then sleep on a condition variable.
 *
 * Decode calls a kernel every ~20-200 us, so waking sleeping threads (futex + IPI, tens of us in a VM)
 * would eat a large share of each call; workers therefore spin for BITTERN_SPIN_US microseconds
 * (default 2000) after each job before sleeping. The caller thread is worker 0.
 *
 * Jobs are "open" while the caller works: every task function takes its work items from a shared
 * counter, so a worker that the OS has descheduled (a busy, shared machine) simply takes no items and
 * the caller does them itself. When the caller runs out of items it closes the job and waits only for
 * the workers that entered it (a Dekker handshake on `active` and `open_gen`), never for one that has
 * not started: a late worker sees the job closed and leaves the caller's context untouched.
 *
 * Build with -DBT_USE_OPENMP -fopenmp to use OpenMP instead (kept for comparison; measured slower for
 * the small, frequent calls of decoding: ~1.1-1.7 us vs ~0.3-1.1 us per fork/join on 2 threads).
 */
#define _GNU_SOURCE
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "bt_internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define BT_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define BT_PAUSE() __asm__ __volatile__("yield")
#else
#define BT_PAUSE() ((void)0)
#endif

int bt_online_cpus(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

#ifdef BT_USE_OPENMP
#include <omp.h>

const char *bt_pool_name(void) { return "openmp"; }
void bt_pool_resize(int n) { BT_UNUSED(n); }
void bt_pool_idle(void) {}

void bt_parallel(bt_task_fn fn, void *ctx, int n) {
    if (n <= 1) {
        fn(ctx, 0, 1);
        return;
    }
#pragma omp parallel num_threads(n)
    fn(ctx, omp_get_thread_num(), omp_get_num_threads());
}

#else
#include <pthread.h>

#define BT_MAX_THREADS 256

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int nworkers; /* threads besides the caller */
    pthread_t th[BT_MAX_THREADS];
    _Atomic unsigned long long gen;      /* bumped for every job (and for shutdown) */
    _Atomic unsigned long long open_gen; /* gen of the job open for entry; 0 when closed */
    _Atomic int active;                  /* workers inside the current job */
    _Atomic int sleepers;   /* workers waiting on cv */
    _Atomic int stop;
    _Atomic unsigned long long idle_gen; /* bumped by bt_pool_idle: spinning workers go to sleep */
    bt_task_fn fn;
    void *ctx;
    int njob; /* threads taking part in the current job */
    long spin_ns;
} bt_pool;

static bt_pool g_pool = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};
static pthread_mutex_t g_pool_lock = PTHREAD_MUTEX_INITIALIZER;

const char *bt_pool_name(void) { return "pthread-pool"; }

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long)ts.tv_sec * 1000000000L + ts.tv_nsec;
}

typedef struct {
    int tid;
    unsigned long long gen0; /* job generation when the worker was created: jobs after it are new */
} bt_worker_arg;

static bt_worker_arg g_args[BT_MAX_THREADS];

static void *worker_main(void *p) {
    int tid = ((bt_worker_arg *)p)->tid; /* 1..nworkers */
    /* not atomic_load(&gen) here: a job posted before this thread first runs would be missed */
    unsigned long long seen = ((bt_worker_arg *)p)->gen0;
    unsigned long long idle_seen = atomic_load(&g_pool.idle_gen); /* read before each job: an idle call
                                                                      after it ends the spin that follows */
    for (;;) {
        unsigned long long g = atomic_load_explicit(&g_pool.gen, memory_order_acquire);
        if (g == seen) {
            /* spin, then sleep (at once after bt_pool_idle) */
            long t0 = now_ns();
            int i = 0;
            while ((g = atomic_load_explicit(&g_pool.gen, memory_order_acquire)) == seen) {
                BT_PAUSE();
                if ((++i & 255) == 0 && (now_ns() - t0 > g_pool.spin_ns ||
                                         atomic_load_explicit(&g_pool.idle_gen, memory_order_relaxed) != idle_seen))
                    break;
            }
            if (g == seen) {
                pthread_mutex_lock(&g_pool.mu);
                atomic_fetch_add(&g_pool.sleepers, 1);
                while ((g = atomic_load(&g_pool.gen)) == seen) pthread_cond_wait(&g_pool.cv, &g_pool.mu);
                atomic_fetch_sub(&g_pool.sleepers, 1);
                pthread_mutex_unlock(&g_pool.mu);
            }
        }
        seen = g;
        idle_seen = atomic_load(&g_pool.idle_gen);
        if (atomic_load(&g_pool.stop)) break;
        atomic_fetch_add(&g_pool.active, 1);
        if (atomic_load(&g_pool.open_gen) == g) { /* still open: fn/ctx are valid until we leave */
            int njob = g_pool.njob;
            if (tid < njob) g_pool.fn(g_pool.ctx, tid, njob);
        }
        atomic_fetch_sub_explicit(&g_pool.active, 1, memory_order_release);
    }
    return NULL;
}

static void pool_stop(void) {
    if (g_pool.nworkers == 0) return;
    atomic_store(&g_pool.stop, 1);
    pthread_mutex_lock(&g_pool.mu);
    atomic_fetch_add(&g_pool.gen, 1);
    pthread_cond_broadcast(&g_pool.cv);
    pthread_mutex_unlock(&g_pool.mu);
    for (int i = 0; i < g_pool.nworkers; i++) pthread_join(g_pool.th[i], NULL);
    g_pool.nworkers = 0;
    atomic_store(&g_pool.stop, 0);
}

/* After fork() only the forking thread exists in the child: forget the parent's workers (they are not
 * there to join) and reinitialise the locks, which another parent thread may have held. */
static void pool_atfork_child(void) {
    pthread_mutex_init(&g_pool.mu, NULL);
    pthread_cond_init(&g_pool.cv, NULL);
    pthread_mutex_init(&g_pool_lock, NULL);
    g_pool.nworkers = 0;
    atomic_store(&g_pool.active, 0);
    atomic_store(&g_pool.sleepers, 0);
    atomic_store(&g_pool.open_gen, 0);
    atomic_store(&g_pool.stop, 0);
}

static void pool_start(int nworkers) {
    static int atfork_done = 0;
    if (!atfork_done) {
        pthread_atfork(NULL, NULL, pool_atfork_child);
        atfork_done = 1;
    }
    const char *e = getenv("BITTERN_SPIN_US");
    long us = e ? atol(e) : 2000;
    g_pool.spin_ns = us < 0 ? 0 : us * 1000L;
    if (nworkers > BT_MAX_THREADS) nworkers = BT_MAX_THREADS;
    int started = 0;
    unsigned long long gen0 = atomic_load(&g_pool.gen);
    for (int i = 0; i < nworkers; i++) {
        g_args[i].tid = i + 1;
        g_args[i].gen0 = gen0;
        if (pthread_create(&g_pool.th[i], NULL, worker_main, &g_args[i]) != 0) break;
        started++;
    }
    g_pool.nworkers = started;
}

void bt_pool_resize(int n) {
    pthread_mutex_lock(&g_pool_lock);
    if (n - 1 != g_pool.nworkers) {
        pool_stop();
        if (n > 1) pool_start(n - 1);
    }
    pthread_mutex_unlock(&g_pool_lock);
}

void bt_pool_idle(void) { atomic_fetch_add(&g_pool.idle_gen, 1); }

void bt_parallel(bt_task_fn fn, void *ctx, int n) {
    if (n <= 1) {
        fn(ctx, 0, 1);
        return;
    }
    pthread_mutex_lock(&g_pool_lock);
    if (g_pool.nworkers < n - 1) {
        pool_stop();
        pool_start(n - 1);
    }
    if (n > g_pool.nworkers + 1) n = g_pool.nworkers + 1;
    g_pool.fn = fn;
    g_pool.ctx = ctx;
    g_pool.njob = n;
    unsigned long long g = atomic_load(&g_pool.gen) + 1;
    atomic_store(&g_pool.open_gen, g);
    atomic_store(&g_pool.gen, g);
    if (atomic_load(&g_pool.sleepers) > 0) {
        pthread_mutex_lock(&g_pool.mu);
        pthread_cond_broadcast(&g_pool.cv);
        pthread_mutex_unlock(&g_pool.mu);
    }
    fn(ctx, 0, n); /* returns when no work items are left to take */
    atomic_store(&g_pool.open_gen, 0);
    int i = 0;
    while (atomic_load(&g_pool.active) > 0) { /* workers finishing the items they took */
        BT_PAUSE();
        if ((++i & 4095) == 0) sched_yield();
    }
    pthread_mutex_unlock(&g_pool_lock);
}
#endif
