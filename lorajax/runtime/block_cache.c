/* lorajax's block cache: keeps large freed blocks mapped for the next request.
 *
 * Loaded with LD_PRELOAD by lorajax.runtime.host_memory (LORAJAX_HOST_PAGES=
 * kept). XLA's CPU runtime allocates a step's temporaries as one block at
 * the start of each execution and frees it at the end; glibc returns such a
 * block to the kernel with munmap, so every step faults it in again. Here a
 * request of at least LORAJAX_BLOCK_MIN bytes (default 64 MiB) gets its own
 * mapping; when freed, the mapping is kept, whole, for the next request of
 * the same size class (sizes rounded up to 1/16 of their power of two), and
 * is never split, so small allocations cannot leave a hole in it. A request
 * no cached block fits (the program is setting up, or its shapes changed)
 * unmaps every cached block first; at most LORAJAX_BLOCK_KEEP bytes
 * (default 8 GiB) stay cached, beyond which the oldest is unmapped.
 *
 * Every other request goes to glibc untouched (__libc_malloc and friends).
 * A block of ours starts one page into its mapping; the page before it holds
 * a header, so free() tells ours from glibc's: a page-aligned pointer whose
 * previous page is mapped and holds our magic word and its own address.
 * realloc and malloc_usable_size read the size from the header.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

extern void *__libc_malloc(size_t);
extern void __libc_free(void *);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);

/* glibc's own malloc_usable_size, for its blocks (looked up once). */
static size_t glibc_usable_size(void *p) {
  static size_t (*real)(void *);
  if (!real) real = (size_t (*)(void *))dlsym(RTLD_NEXT, "malloc_usable_size");
  return real ? real(p) : 0;
}

#define PAGE 4096UL
#define MAGIC 0x6c6f72616a617862ULL /* "lorajaxb" */
#define MAX_CACHED 64

struct header {
  uint64_t magic;
  uint64_t self;  /* the header's own address, xor MAGIC: stale bytes that
                   * happen to spell MAGIC elsewhere do not pass for ours */
  size_t mapped;  /* bytes of the whole mapping, header page included */
  size_t asked;   /* bytes the caller asked for */
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static void *cached[MAX_CACHED]; /* mapping starts, oldest first */
static size_t n_cached, cached_bytes;
static size_t block_min = 64UL << 20, keep_max = 8UL << 30;
static int configured;

static void configure(void) {
  const char *s = getenv("LORAJAX_BLOCK_MIN");
  if (s && atol(s) > 0) block_min = (size_t)atol(s);
  s = getenv("LORAJAX_BLOCK_KEEP");
  if (s && atol(s) >= 0) keep_max = (size_t)atol(s);
  configured = 1;
}

static size_t size_class(size_t n) {
  size_t top = 1;
  while (top < n) top <<= 1;
  size_t step = top / 16 < PAGE ? PAGE : top / 16;
  return (n + step - 1) / step * step;
}

static int wants(size_t n) {
  if (!configured) configure();
  return n >= block_min && n < ((size_t)1 << 46);
}

static struct header *header_of(void *p) {
  if (!p || ((uintptr_t)p & (PAGE - 1))) return NULL;
  struct header *h = (struct header *)((char *)p - PAGE);
  /* A page-aligned glibc block may sit at the start of a mapping whose
   * previous page is unmapped; only ours can be read safely there, so
   * check that the page before is mapped before reading it. */
  unsigned char vec;
  if (mincore((void *)h, PAGE, &vec) != 0) return NULL;
  return h->magic == MAGIC && h->self == ((uint64_t)(uintptr_t)h ^ MAGIC)
             ? h : NULL;
}

static void *take(size_t n) {
  size_t want = size_class(n) + PAGE;
  struct header *h = NULL;
  void *evict[MAX_CACHED];
  size_t n_evict = 0;
  pthread_mutex_lock(&lock);
  for (size_t i = 0; i < n_cached; i++) {
    struct header *c = cached[i];
    if (c->mapped == want) {
      h = c;
      memmove(&cached[i], &cached[i + 1], (n_cached - i - 1) * sizeof(void *));
      n_cached--;
      cached_bytes -= want;
      break;
    }
  }
  if (!h) {
    /* A miss: the program asks for sizes it has not freed before (it is
     * setting up, or its steps changed shape), so what is cached now is
     * unlikely to be asked for again. Unmap it rather than hold it. */
    for (size_t i = 0; i < n_cached; i++) evict[n_evict++] = cached[i];
    n_cached = 0;
    cached_bytes = 0;
  }
  pthread_mutex_unlock(&lock);
  for (size_t i = 0; i < n_evict; i++) {
    struct header *e = evict[i];
    munmap(e, e->mapped);
  }
  if (!h) {
    void *m = mmap(NULL, want, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return NULL;
    h = m;
    h->magic = MAGIC;
    h->self = (uint64_t)(uintptr_t)h ^ MAGIC;
    h->mapped = want;
  }
  h->asked = n;
  return (char *)h + PAGE;
}

static void give_back(struct header *h) {
  void *evict[MAX_CACHED];
  size_t n_evict = 0;
  pthread_mutex_lock(&lock);
  if (h->mapped > keep_max) {
    evict[n_evict++] = h;
  } else {
    while (n_cached > 0 &&
           (n_cached == MAX_CACHED || cached_bytes + h->mapped > keep_max)) {
      struct header *old = cached[0];
      memmove(&cached[0], &cached[1], (n_cached - 1) * sizeof(void *));
      n_cached--;
      cached_bytes -= old->mapped;
      evict[n_evict++] = old;
    }
    cached[n_cached++] = h;
    cached_bytes += h->mapped;
  }
  pthread_mutex_unlock(&lock);
  for (size_t i = 0; i < n_evict; i++) {
    struct header *e = evict[i];
    munmap(e, e->mapped);
  }
}

void *malloc(size_t n) {
  if (wants(n)) {
    void *p = take(n);
    if (!p) errno = ENOMEM;
    return p;
  }
  return __libc_malloc(n);
}

void free(void *p) {
  struct header *h = header_of(p);
  if (h) give_back(h);
  else __libc_free(p);
}

void *calloc(size_t count, size_t size) {
  size_t n;
  if (__builtin_mul_overflow(count, size, &n)) {
    errno = ENOMEM;
    return NULL;
  }
  if (wants(n)) {
    void *p = take(n);
    if (!p) errno = ENOMEM;
    else memset(p, 0, n);
    return p;
  }
  return __libc_calloc(count, size);
}

void *realloc(void *p, size_t n) {
  struct header *h = header_of(p);
  if (!h) {
    if (!p || !wants(n)) return __libc_realloc(p, n);
    /* A glibc block grows into one of ours. */
    void *q = take(n);
    if (!q) {
      errno = ENOMEM;
      return NULL;
    }
    size_t old = glibc_usable_size(p);
    memcpy(q, p, old < n ? old : n);
    __libc_free(p);
    return q;
  }
  if (n == 0) {
    give_back(h);
    return NULL;
  }
  void *q = wants(n) ? take(n) : __libc_malloc(n);
  if (!q) {
    errno = ENOMEM;
    return NULL;
  }
  memcpy(q, p, h->asked < n ? h->asked : n);
  give_back(h);
  return q;
}

static void *aligned(size_t align, size_t n) {
  if (wants(n) && align <= PAGE) return take(n);
  return __libc_memalign(align, n);
}

int posix_memalign(void **out, size_t align, size_t n) {
  if (align < sizeof(void *) || (align & (align - 1))) return EINVAL;
  void *p = aligned(align, n);
  if (!p && n) return ENOMEM;
  *out = p;
  return 0;
}

void *aligned_alloc(size_t align, size_t n) {
  void *p = aligned(align, n);
  if (!p && n) errno = ENOMEM;
  return p;
}

void *memalign(size_t align, size_t n) {
  void *p = aligned(align, n);
  if (!p && n) errno = ENOMEM;
  return p;
}

size_t malloc_usable_size(void *p) {
  struct header *h = header_of(p);
  if (h) return h->mapped - PAGE;
  return glibc_usable_size(p);
}
