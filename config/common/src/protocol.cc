#include "cortex/protocol.h"

namespace cortex {

const std::vector<WireOp>& WireOps() {
  static const std::vector<WireOp> kOps = {
      {Op::kSubmit,
       "submit",
       {"text", "tags", "wait", "timeout_s"},
       "submit",
       "queue a task; prints its id"},
      {Op::kWait,
       "wait",
       {"id", "timeout_s"},
       "wait",
       "wait for a queued or running task to finish"},
      {Op::kCancel,
       "cancel",
       {"id", "timeout_s"},
       "cancel",
       "cancel a task: a queued one never runs, a running one's expert is asked to stop"},
      {Op::kRoute,
       "route",
       {"text", "tags"},
       "route",
       "dry run: rank every expert for a task; runs nothing"},
      {Op::kShow, "show", {"id"}, "show", "one task: decision, attempts, outcome, feedback"},
      {Op::kHistory,
       "history",
       {"limit", "expert", "since", "after_seq", "outcome"},
       "history",
       "the audit log, newest first"},
      {Op::kExperts, "experts", {}, "experts", "loaded experts and how they have done"},
      {Op::kRelease,
       "release",
       {"expert"},
       "experts release",
       "lift an expert's quarantine after repeated crashes"},
      {Op::kEvents,
       "events",
       {"limit"},
       "events",
       "what happened to experts, models and cortexd: plugin loads, refusals and removals, "
       "crashes and quarantines, retrains and rollbacks"},
      {Op::kConfidence,
       "confidence",
       {"expert"},
       "confidence",
       "how confident the router is, and how well that matched outcomes"},
      {Op::kFeedback,
       "feedback",
       {"id", "quality", "note"},
       "feedback",
       "a person's verdict on a task's outcome (training signal)"},
      {Op::kReload, "reload", {}, "reload", "rescan the plugin folder and re-read the config"},
      {Op::kStatus, "status", {}, "status", "daemon health"},
      {Op::kRetrain,
       "retrain",
       {"wait"},
       "retrain",
       "train a candidate model now; with --wait, its offline metrics and verdict"},
      {Op::kModels, "models", {}, "models", "model versions with their metrics, and which is live"},
      {Op::kExplain,
       "explain",
       {"id"},
       "explain",
       "rebuild the weights that made a decision; each candidate's score and features"},
      {Op::kRollback,
       "rollback",
       {"version", "force"},
       "models rollback",
       "make an older model version live again"},
      {Op::kExport,
       "export",
       {"since"},
       "export",
       "stream the audit log: one decision with its outcome per line"},
      {Op::kReport,
       "report",
       {"since", "until", "buckets"},
       "report",
       "a self-contained HTML page with plots of routing quality, load, latency and models"},
  };
  return kOps;
}

const WireOp* FindWireOp(std::string_view name) {
  for (const WireOp& op : WireOps())
    if (name == op.name) return &op;
  return nullptr;
}

const WireOp& WireOpOf(Op id) {
  for (const WireOp& op : WireOps())
    if (op.id == id) return op;
  return WireOps().front();  // unreachable: the table holds every Op (tests/cli_test.cc)
}

std::string WireOpNames() {
  std::string out;
  for (const WireOp& op : WireOps()) out += (out.empty() ? "" : ", ") + std::string(op.name);
  return out;
}

}  // namespace cortex
