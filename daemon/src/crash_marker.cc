#include "crash_marker.h"

#include <signal.h>
#include <string.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>

namespace cortex {
namespace {

std::atomic<int> g_marker_fd{-1};
// The first signal decides: a sanitizer's handler that reports a signal sent from outside
// and then calls abort() must not turn that kill into a crash.
std::atomic<bool> g_seen{false};
constexpr int kSignals[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT};
struct sigaction g_previous[sizeof kSignals / sizeof kSignals[0]];

// Async-signal-safe only: pwrite, fsync, sigaction, raise.
void OnFault(int sig, siginfo_t* info, void* ctx) {
  // A fault the kernel raised (si_code > 0) or an abort() of our own is a crash; the same
  // signal sent from outside (kill -ABRT for a core dump, a watchdog) is not the task's
  // doing and is not written down.
  const bool ours = info && (info->si_code > 0 || info->si_pid == getpid());
  int fd = g_marker_fd.load();
  if (!g_seen.exchange(true) && ours && fd >= 0) {
    char msg[32] = "crashed: signal ";
    size_t n = strlen(msg);
    if (sig >= 10) msg[n++] = static_cast<char>('0' + sig / 10);
    msg[n++] = static_cast<char>('0' + sig % 10);
    msg[n++] = '\n';
    if (pwrite(fd, msg, n, 0) == static_cast<ssize_t>(n)) fsync(fd);
  }
  for (size_t i = 0; i < sizeof kSignals / sizeof kSignals[0]; ++i) {
    if (kSignals[i] != sig) continue;
    const struct sigaction& prev = g_previous[i];
    if (prev.sa_flags & SA_SIGINFO) {
      if (prev.sa_sigaction) return prev.sa_sigaction(sig, info, ctx);
    } else if (prev.sa_handler != SIG_DFL && prev.sa_handler != SIG_IGN) {
      return prev.sa_handler(sig);
    }
  }
  // Default action: for a fault the instruction runs again and kills us; a raised signal
  // (abort, kill -SEGV) is raised again, now unhandled.
  signal(sig, SIG_DFL);
  raise(sig);
}

}  // namespace

void UseCrashStackOnThisThread() {
  // A sanitizer gives each thread a signal stack of its own and unmaps it at thread exit:
  // such a thread keeps it.
  stack_t old = {};
  if (sigaltstack(nullptr, &old) == 0 && !(old.ss_flags & SS_DISABLE)) return;
  thread_local char alt_stack[64 * 1024];
  stack_t ss = {};
  ss.ss_sp = alt_stack;
  ss.ss_size = sizeof alt_stack;
  sigaltstack(&ss, nullptr);
}

void InstallCrashHandlers() {
  UseCrashStackOnThisThread();
  struct sigaction sa = {};
  sa.sa_sigaction = OnFault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  for (size_t i = 0; i < sizeof kSignals / sizeof kSignals[0]; ++i)
    sigaction(kSignals[i], &sa, &g_previous[i]);
}

void SetCrashMarkerFd(int fd) { g_marker_fd.store(fd); }

std::string TakeCrashMarker(int fd) {
  std::string text;
  char buf[64];
  ssize_t n = pread(fd, buf, sizeof buf, 0);
  if (n > 0) text.assign(buf, static_cast<size_t>(n));
  while (!text.empty() && (text.back() == '\n' || text.back() == '\0')) text.pop_back();
  if (!text.empty() && ftruncate(fd, 0) == 0) fsync(fd);
  return text;
}

}  // namespace cortex
