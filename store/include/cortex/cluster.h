// A cluster's shared state in PostgreSQL, apart from the audit store: the nodes with
// their heartbeats and experts, the shared queue's claims, the trainer's lock, and the
// notifications that wake nodes (LISTEN/NOTIFY). One per node, on connections of its own.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "cortex/status.h"
#include "cortex/types.h"

namespace cortex {

// An expert as a node publishes it: enough for other nodes to route to it.
struct NodeExpert {
  std::string name, description;
  std::vector<std::string> keywords, examples;
  int capacity = 1;
  int inflight = 0;  // attempts running on it now
  bool quarantined = false;
};

struct NodeInfo {
  std::string node, socket;
  int pid = 0;
  double started_at = 0, heartbeat_at = 0;  // the server's clock (unix seconds)
  bool alive = true;                        // heartbeat within the timeout, not declared lost
  bool trainer = false;                     // holds the trainer's lock
  std::vector<NodeExpert> experts;
};

// What woke a node: work in the shared queue, task ends, a new live model.
struct ClusterNews {
  bool work = false;
  std::vector<std::string> ended;  // task ids
  bool model = false;
  std::vector<std::string> cancel;  // task ids whose node is asked to cancel them
};

class ClusterLink {
 public:
  virtual ~ClusterLink() = default;
  // Publishes this node (its experts and their load) with a fresh heartbeat. `was_lost`:
  // the others had declared it lost (its tasks were taken over); it is back now.
  virtual Status Heartbeat(const NodeInfo& me, bool* was_lost) = 0;
  // Declares lost every other node without a heartbeat for `timeout_s`: its running tasks
  // are interrupted (their open attempts too), its unstarted ones go to the shared queue,
  // and an expert event says so. The names of the nodes declared lost now, and the tasks
  // interrupted (their waiters are told).
  virtual Status ReapLost(double timeout_s, std::vector<std::string>* lost,
                          std::vector<std::string>* interrupted) = 0;
  // Every node known, alive or not (alive: a heartbeat within `timeout_s`, not lost).
  virtual Status Nodes(double timeout_s, std::vector<NodeInfo>* out) = 0;
  // The ids of up to `n` tasks from the shared queue waiting for `expert` ("": waiting
  // to be routed), oldest first, made this node's (FOR UPDATE SKIP LOCKED: two nodes
  // never take the same one).
  virtual Status Claim(const std::string& expert, int n, std::vector<std::string>* ids) = 0;
  // Takes the trainer's lock if no node holds it; true while this node does. It goes
  // with this node's connection: a node that dies frees it for another.
  virtual bool Trainer() = 0;
  // Tells every node (after the commit it follows): work for `expert`, a task's end,
  // a new live model.
  virtual void NotifyWork(const std::string& expert) = 0;
  virtual void NotifyEnded(const std::vector<std::string>& ids) = 0;
  virtual void NotifyModel(int version) = 0;
  virtual void NotifyCancel(const std::string& id) = 0;
  // This node stops: its unstarted tasks go to the shared queue (how many: `handed`), its
  // trainer's role is freed, and it is shown as gone, not lost.
  virtual Status Leave(int* handed) = 0;
  // Waits up to `timeout_s` for notifications (or Interrupt).
  virtual Status Wait(double timeout_s, ClusterNews* out) = 0;
  virtual void Interrupt() = 0;
};

// Opens the cluster link of node `node` on the database `url` (whose store is open, so
// its schema is there). Refused when a live node already has that name.
Result<std::unique_ptr<ClusterLink>> OpenClusterLink(const std::string& url,
                                                     const std::string& node);

}  // namespace cortex
