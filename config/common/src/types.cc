#include "cortex/types.h"

namespace cortex {

const char* ToString(TaskState s) {
  switch (s) {
    case TaskState::kQueued:
      return "queued";
    case TaskState::kRouted:
      return "routed";
    case TaskState::kRunning:
      return "running";
    case TaskState::kSucceeded:
      return "succeeded";
    case TaskState::kFailed:
      return "failed";
    case TaskState::kCancelled:
      return "cancelled";
    case TaskState::kInterrupted:
      return "interrupted";
  }
  return "unknown";
}

const char* ToString(OutcomeKind k) {
  switch (k) {
    case OutcomeKind::kSuccess:
      return "success";
    case OutcomeKind::kFailure:
      return "failure";
    case OutcomeKind::kTimeout:
      return "timeout";
    case OutcomeKind::kCrash:
      return "crash";
    case OutcomeKind::kRejected:
      return "rejected";
    case OutcomeKind::kInterrupted:
      return "interrupted";
  }
  return "unknown";
}

std::optional<TaskState> ParseTaskState(const std::string& s) {
  for (TaskState t :
       {TaskState::kQueued, TaskState::kRouted, TaskState::kRunning, TaskState::kSucceeded,
        TaskState::kFailed, TaskState::kCancelled, TaskState::kInterrupted})
    if (s == ToString(t)) return t;
  return std::nullopt;
}

std::optional<OutcomeKind> ParseOutcomeKind(const std::string& s) {
  for (OutcomeKind k : {OutcomeKind::kSuccess, OutcomeKind::kFailure, OutcomeKind::kTimeout,
                        OutcomeKind::kCrash, OutcomeKind::kRejected, OutcomeKind::kInterrupted})
    if (s == ToString(k)) return k;
  return std::nullopt;
}

}  // namespace cortex
