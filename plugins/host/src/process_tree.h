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

}  // namespace cortex
