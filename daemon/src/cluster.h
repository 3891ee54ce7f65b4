// A node of a cluster (store.url; docs/CLUSTER.md): it publishes its experts and load
// with a heartbeat, declares lost the nodes whose heartbeats stop, claims from the shared
// queue the work its experts can take (woken by LISTEN/NOTIFY), tells the other nodes of
// work it hands on and tasks that end, and holds the trainer's role when it is free.
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "cortex/cluster.h"
#include "cortex/experts.h"
#include "cortex/store.h"
#include "pipeline.h"

namespace cortex {

struct ClusterOptions {
  std::string node;        // this node's name (daemon.node)
  std::string socket;      // shown to the others
  double heartbeat_s = 1;  // how often it heartbeats
  double timeout_s = 5;    // a node silent this long is lost (daemon.node_timeout)
  double started_at = 0;
  bool was_lost = false;  // its first heartbeat (before recovery) found it declared lost
};

class Cluster : public ClusterHooks {
 public:
  // `on_model`: another node made a model live (the trainer reloads it).
  Cluster(ClusterOptions options, std::unique_ptr<ClusterLink> link, Store* store,
          ExpertRegistry* registry, Pipeline* pipeline, std::function<void()> on_model);
  ~Cluster() override;

  void Start();  // after the pipeline's
  // After the pipeline stopped: this node's unstarted tasks go to the shared queue, and
  // it leaves (the others do not wait for its heartbeat to run them).
  void Stop();

  void Released(const std::vector<std::string>& experts) override;
  void Ended(const std::string& id) override;
  Status CancelElsewhere(const std::string& id) override;
  void SlotFreed();  // a local slot came free: claim more if the shared queue had work
  bool Trainer() const { return trainer_.load(); }
  std::string TrainerNode();  // the node that holds the trainer's role ("": none)
  void ModelChanged(int version);
  const std::string& node() const { return options_.node; }
  nlohmann::json Nodes();          // for `status`
  nlohmann::json RemoteExperts();  // for `experts`: instances on other live nodes

 private:
  void HeartbeatLoop();
  void ListenLoop();
  void NotifyLoop();
  void Beat();
  void ClaimWork();
  NodeInfo Me();

  const ClusterOptions options_;
  std::unique_ptr<ClusterLink> link_;
  Store* const store_;
  ExpertRegistry* const registry_;
  Pipeline* const pipeline_;
  const std::function<void()> on_model_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> trainer_{false};
  std::atomic<bool> shared_work_{true};  // the shared queue may hold work for us
  bool joined_ = false;
  // Since when (monotonic s) this node's heartbeats have gone through without a break;
  // it declares others lost only after a whole timeout of its own: after an outage of
  // the database every node is silent, and none is dead for that.
  double healthy_since_ = -1;

  std::mutex view_mu_;
  std::vector<NodeInfo> nodes_;  // as of the last heartbeat (view_mu_)

  std::mutex mu_;  // what the notifier sends (below)
  std::condition_variable cv_;
  std::vector<std::string> ended_, released_;
  bool claim_due_ = false;
  std::mutex claim_mu_;  // one claim at a time
  std::thread heartbeat_, listener_, notifier_;
};

}  // namespace cortex
