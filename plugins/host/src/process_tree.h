// Ends what a plugin host leaves behind. A host starts its own session (setsid), so
// every process a plugin forks or a command expert runs shares the host's session id,
// whatever process group it moved to, and keeps it after its parent dies.
#pragma once

#include <sys/types.h>

namespace cortex {

// SIGKILLs every process in session `sid` except `keep`, in a few passes so that
// children forked meanwhile are caught too. Returns how many were signalled. A process
// that starts a session of its own (setsid) escapes: that is the known limit.
int KillSession(pid_t sid, pid_t keep);

// Sends `sig` to every living descendant of `root` (not to `root`), found through their
// parents while the chain is intact: a program's children in process groups of their own
// are reached too. Returns how many were signalled.
int SignalDescendants(pid_t root, int sig);

}  // namespace cortex
