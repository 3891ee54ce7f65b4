// The poison-task guard needs to tell a crash of cortexd (a fault while it routed or ran
// a task) from a kill from outside (kill -9, kill -ABRT, a reboot): only a crash is
// counted against the tasks in flight. A fault handler writes which signal it was into the
// store's lock file (only for a fault the kernel raised or an abort() of cortexd's own);
// the next start reads and clears it.
#pragma once

#include <string>

namespace cortex {

// Installs the fault handlers (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT) for the process.
// Each writes the marker, if one is set, then hands the signal on to the handler that
// was there before (a sanitizer's) or to the default action, so the exit is unchanged.
void InstallCrashHandlers();

// Gives the calling thread its own signal stack, so the handler also runs when the fault
// is that thread's stack overflowing (a signal stack is per thread).
void UseCrashStackOnThisThread();

// The descriptor the handlers write to (-1: none). The daemon sets it once it holds the
// store's lock file, and clears it before closing that file.
void SetCrashMarkerFd(int fd);

// Reads the marker left in `fd` by a crashed predecessor ("" if it did not crash), and
// clears it.
std::string TakeCrashMarker(int fd);

}  // namespace cortex
