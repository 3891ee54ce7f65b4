// cortex-plugin-host: runs one plugin instance for cortexd in a process of its own, so a
// plugin that segfaults, aborts, hangs or runs out of memory takes down only this
// process. cortexd spawns it with its end of a socket pair on fd 3 and supervises it
// (plugins/host/src/host_process.cc); the protocol is in host_protocol.h.
//
//   cortex-plugin-host --library COPY --display FILE [--memory-limit BYTES]
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <system_error>
#include <thread>

#include "host_protocol.h"
#include "plugin_library.h"
#include "process_tree.h"

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define CORTEX_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define CORTEX_SANITIZED 1
#endif
#endif

#ifdef CORTEX_SANITIZED
// A plugin's segfault should end its host the way it does in a release build (killed by
// SIGSEGV), not as a sanitizer report; the sanitizers still check the host's own code.
extern "C" __attribute__((visibility("default"), used)) const char* __asan_default_options() {
  return "handle_segv=0:handle_sigbus=0:handle_sigfpe=0:handle_sigill=0";
}
extern "C" __attribute__((visibility("default"), used)) const char* __tsan_default_options() {
  return "handle_segv=0:handle_sigbus=0:handle_sigfpe=0:handle_sigill=0";
}
#endif

namespace cortex {
namespace {

using json = nlohmann::json;
constexpr int kFd = hostproto::kHostFd;

hostproto::FrameWriter g_out(kFd);  // results come from the run threads at once
char g_oom_frame[64];
size_t g_oom_len = 0;
// Set once the memory limit is in place: from then on a mapping refused for want of
// memory is the plugin going over it.
std::atomic<bool> g_limited{false};

// Every way out but running out of memory: first end everything the plugin started (it
// all shares this host's session), so nothing outlives the host or cortexd.
[[noreturn]] void Leave(int code) {
  KillSession(getpid(), getpid());
  _exit(code);
}

// cortexd's end of the socket closing (cortexd stopped or was killed) ends the host even
// while its main thread is stuck in plugin code: a constructor or create() that never
// returns. POLLRDHUP is seen without reading, so the frames stay the main thread's.
void WatchForCortexdsEnd() {
  std::thread([] {
    for (;;) {
      struct pollfd p = {kFd, POLLRDHUP, 0};
      int r = ::poll(&p, 1, -1);
      if (r < 0 && errno == EINTR) continue;
      if (r < 0 || (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL))) Leave(0);
    }
  }).detach();
}

void Send(const json& j) {
  if (!g_out.Send(j).ok()) Leave(0);  // cortexd is gone
}

// Runs when an allocation fails under the memory limit: tell cortexd why, then go.
// Only write() and _exit(): the heap cannot be trusted any more.
void OnOutOfMemory() {
  ssize_t w = ::write(kFd, g_oom_frame, g_oom_len);
  (void)w;
  _exit(hostproto::kExitOutOfMemory);
}

void PrepareOomFrame() {
  const char body[] = "{\"op\":\"oom\"}";
  const uint32_t n = sizeof body - 1;
  for (int i = 0; i < 4; ++i) g_oom_frame[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  std::memcpy(g_oom_frame + 4, body, n);
  g_oom_len = 4 + n;
}

// The host's address space now, from /proc/self/statm (0 if it cannot be read).
size_t AddressSpaceInUse() {
  int fd = ::open("/proc/self/statm", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  char buf[128];
  ssize_t n = ::read(fd, buf, sizeof buf - 1);
  ::close(fd);
  if (n <= 0) return 0;
  buf[n] = 0;
  return std::strtoull(buf, nullptr, 10) * static_cast<size_t>(::sysconf(_SC_PAGESIZE));
}

// Lowers a limit to `want`, or to its hard limit if that is lower.
bool Limit(int resource, rlim_t want) {
  struct rlimit r {};
  if (getrlimit(resource, &r) != 0) return false;
  if (r.rlim_max != RLIM_INFINITY) want = std::min(want, r.rlim_max);
  r.rlim_cur = r.rlim_max = want;
  return setrlimit(resource, &r) == 0;
}

// The memory limit bounds what the plugin adds to its host. RLIMIT_DATA (heap and private
// writable mappings) alone left out shared mappings (MAP_SHARED, shm, memfd), so
// RLIMIT_AS bounds everything mapped too: the address space the host had before loading
// the plugin, plus the limit. What the plugin reserves counts there, used or not: its code
// and libraries, and the stack of each thread running a task (RLIMIT_STACK, 8 MiB by
// default); malloc keeps to one arena instead of reserving 64 MiB per thread. Sanitizer
// runtimes reserve terabytes of shadow memory, so there it cannot be enforced.
size_t ApplyLimits(size_t memory_limit) {
  struct rlimit core = {0, 0};
  setrlimit(RLIMIT_CORE, &core);  // a crashing plugin leaves no core files behind
#ifdef CORTEX_SANITIZED
  return 0;
#else
  if (!memory_limit) return 0;
  const size_t base = AddressSpaceInUse();
  if (!base) return 0;
  mallopt(M_ARENA_MAX, 1);
  if (!Limit(RLIMIT_DATA, memory_limit) || !Limit(RLIMIT_AS, base + memory_limit)) return 0;
  g_limited = true;
  return memory_limit;
#endif
}

// Each run gets a thread at once (a run may take minutes; none waits behind another);
// threads are kept once started, so a steady stream of short runs starts none.
class RunThreads {
 public:
  void Post(std::function<void()> run) {
    std::lock_guard<std::mutex> l(mu_);
    work_.push_back(std::move(run));
    if (work_.size() <= idle_) {
      cv_.notify_one();
      return;
    }
    try {
      std::thread([this] { Loop(); }).detach();  // lives as long as the host
    } catch (const std::system_error&) {
      // Under the limit, no room for another thread's stack is running out of memory.
      if (g_limited) OnOutOfMemory();
      throw;
    }
  }

 private:
  void Loop() {
    std::unique_lock<std::mutex> l(mu_);
    for (;;) {
      while (work_.empty()) {
        ++idle_;
        cv_.wait(l);
        --idle_;
      }
      std::function<void()> run = std::move(work_.front());
      work_.pop_front();
      l.unlock();
      run();
      l.lock();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> work_;
  size_t idle_ = 0;  // threads waiting for work
};

int Serve(const std::string& library, const std::string& display, size_t memory_limit) {
  const size_t enforced = ApplyLimits(memory_limit);
  std::unique_ptr<PluginLibrary> lib;
  Status st = PluginLibrary::Open(library, display, &lib);
  if (!st.ok()) {
    Send({{"op", "hello"}, {"error", st.message()}});
    return 0;
  }
  Send({{"op", "hello"},
        {"pid", getpid()},
        {"memory_limit", enforced},
        {"manifest", hostproto::ManifestToJson(lib->manifest())}});

  const cortex_plugin_api* api = lib->api();
  void* instance = nullptr;
  std::mutex runs_mu;
  std::map<uint64_t, std::shared_ptr<Execution>> runs;
  RunThreads pool;
  hostproto::FrameReader reader;
  char buf[65536];
  while (true) {
    ssize_t n = ::read(kFd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) Leave(0);  // cortexd closed its end or died: nothing left to serve
    std::vector<json> frames;
    if (!reader.Feed(buf, static_cast<size_t>(n), &frames).ok()) Leave(2);
    for (const json& f : frames) {
      const std::string op = f["op"].get<std::string>();
      if (op == "create" && !instance) {
        std::string settings = f.value("settings", "{}");
        char err[512] = {0};
        instance = api->create(settings.c_str(), err, sizeof err);
        if (instance)
          Send({{"op", "created"}});
        else
          Send({{"op", "created"},
                {"error", err[0] ? std::string(err, strnlen(err, sizeof err))
                                 : "the plugin refused these settings"}});
      } else if (op == "run" && instance && f.contains("id") && f["id"].is_number_unsigned()) {
        const uint64_t id = f["id"].get<uint64_t>();
        Task task;
        int64_t deadline = 0;
        if (!hostproto::TaskFromJson(f.value("task", json()), &task, &deadline).ok()) Leave(2);
        auto exec = std::make_shared<Execution>(task, deadline);
        {
          std::lock_guard<std::mutex> l(runs_mu);
          runs[id] = exec;
        }
        // Capacity is enforced by cortexd, which sends no more runs than slots.
        pool.Post([&, id, exec] {
          exec->Run(api, instance);
          {
            std::lock_guard<std::mutex> l(runs_mu);
            runs.erase(id);
          }
          Send({{"op", "result"},
                {"id", id},
                {"outcome", hostproto::OutcomeToJson(exec->TakeOutcome())}});
        });
      } else if (op == "cancel" && f.contains("id") && f["id"].is_number_unsigned()) {
        std::lock_guard<std::mutex> l(runs_mu);
        auto it = runs.find(f["id"].get<uint64_t>());
        if (it != runs.end()) it->second->Cancel();
      } else if (op == "exit") {
        bool idle;
        {
          std::lock_guard<std::mutex> l(runs_mu);
          idle = runs.empty();
        }
        // destroy() only when nothing runs: calling it under a running execute() would
        // be the host's bug, not the plugin's.
        if (idle && instance) api->destroy(instance);
        Leave(0);
      } else {
        Leave(2);  // cortexd never sends anything else: the stream is not ours
      }
    }
  }
}

}  // namespace
}  // namespace cortex

#ifndef CORTEX_SANITIZED
// The plugin's own calls that map memory come here (exported: host_exports.list) on their
// way to the C library. Under the limit, one refused for want of memory is the plugin
// going over it: the host says so and ends, as when `new` fails, instead of leaving the
// plugin to write through MAP_FAILED. (glibc's own mappings, malloc's and thread stacks',
// do not pass here: malloc returns null, `new` ends through the new handler, a thread
// that cannot start is caught in RunThreads.) A raw system call is still refused; it is
// then the plugin's to handle.
namespace {
template <class Fn>
Fn Next(std::atomic<Fn>* cache, const char* name) {
  Fn f = cache->load(std::memory_order_acquire);
  if (!f) {
    f = reinterpret_cast<Fn>(dlsym(RTLD_NEXT, name));
    cache->store(f, std::memory_order_release);
  }
  return f;
}
void* Checked(void* p) {
  if (p == MAP_FAILED && errno == ENOMEM && cortex::g_limited.load()) cortex::OnOutOfMemory();
  return p;
}
using MmapFn = void* (*)(void*, size_t, int, int, int, off_t);
using Mmap64Fn = void* (*)(void*, size_t, int, int, int, off64_t);
using MremapFn = void* (*)(void*, size_t, size_t, int, ...);
std::atomic<MmapFn> g_mmap{nullptr};
std::atomic<Mmap64Fn> g_mmap64{nullptr};
std::atomic<MremapFn> g_mremap{nullptr};
}  // namespace

extern "C" void* mmap(void* addr, size_t len, int prot, int flags, int fd, off_t off) __THROW {
  MmapFn next = Next(&g_mmap, "mmap");
  if (!next) {
    errno = ENOSYS;
    return MAP_FAILED;
  }
  return Checked(next(addr, len, prot, flags, fd, off));
}

extern "C" void* mmap64(void* addr, size_t len, int prot, int flags, int fd, off64_t off) __THROW {
  Mmap64Fn next = Next(&g_mmap64, "mmap64");
  if (!next) {
    errno = ENOSYS;
    return MAP_FAILED;
  }
  return Checked(next(addr, len, prot, flags, fd, off));
}

extern "C" void* mremap(void* addr, size_t old_len, size_t new_len, int flags, ...) __THROW {
  void* to = nullptr;  // the fifth argument, only with MREMAP_FIXED
  if (flags & MREMAP_FIXED) {
    va_list ap;
    va_start(ap, flags);
    to = va_arg(ap, void*);
    va_end(ap);
  }
  MremapFn next = Next(&g_mremap, "mremap");
  if (!next) {
    errno = ENOSYS;
    return MAP_FAILED;
  }
  return Checked(next(addr, old_len, new_len, flags, to));
}
#endif

int main(int argc, char** argv) {
  std::string library, display;
  size_t memory_limit = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i];
    if (k == "--library")
      library = argv[i + 1];
    else if (k == "--display")
      display = argv[i + 1];
    else if (k == "--memory-limit")
      memory_limit = std::strtoull(argv[i + 1], nullptr, 10);
  }
  if (library.empty() || fcntl(cortex::kFd, F_GETFD) < 0) {
    std::fprintf(stderr,
                 "cortex-plugin-host: runs a Cortex plugin for cortexd, which starts it with a "
                 "socket on fd 3; it is not meant to be run by hand\n");
    return 2;
  }
  fcntl(cortex::kFd, F_SETFD, FD_CLOEXEC);  // programs a plugin starts do not inherit it
  signal(SIGPIPE, SIG_IGN);
  cortex::PrepareOomFrame();
  std::set_new_handler(cortex::OnOutOfMemory);
  cortex::WatchForCortexdsEnd();
  return cortex::Serve(library, display.empty() ? library : display, memory_limit);
}
