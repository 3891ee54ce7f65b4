#include "cluster.h"

#include <unistd.h>

#include <map>
#include <set>

#include "cortex/log.h"
#include "cortex/wire.h"

namespace cortex {

using json = nlohmann::json;

Cluster::Cluster(ClusterOptions options, std::unique_ptr<ClusterLink> link, Store* store,
                 ExpertRegistry* registry, Pipeline* pipeline, std::function<void()> on_model)
    : options_(std::move(options)),
      link_(std::move(link)),
      store_(store),
      registry_(registry),
      pipeline_(pipeline),
      on_model_(std::move(on_model)) {}

Cluster::~Cluster() { Stop(); }

void Cluster::Start() {
  Beat();  // the others see this node (and routing sees theirs) before the first task
  heartbeat_ = std::thread([this] {
    pthread_setname_np(pthread_self(), "heartbeat");
    HeartbeatLoop();
  });
  listener_ = std::thread([this] {
    pthread_setname_np(pthread_self(), "cluster-listen");
    ListenLoop();
  });
  notifier_ = std::thread([this] {
    pthread_setname_np(pthread_self(), "cluster-notify");
    NotifyLoop();
  });
}

void Cluster::Stop() {
  if (stop_.exchange(true)) return;
  link_->Interrupt();
  cv_.notify_all();
  for (std::thread* t : {&heartbeat_, &listener_, &notifier_})
    if (t->joinable()) t->join();
  int handed = 0;
  if (Status st = link_->Leave(&handed); !st.ok())
    LogWarn("cluster: leaving: {}; the others take this node's tasks once it is declared lost",
            st.message());
  else
    LogInfo("cluster: node {} left; {} unstarted task(s) handed to the shared queue", options_.node,
            handed);
}

NodeInfo Cluster::Me() {
  NodeInfo me;
  me.node = options_.node;
  me.socket = options_.socket;
  me.pid = static_cast<int>(getpid());
  me.started_at = options_.started_at;
  for (const auto& e : registry_->Active()) {
    const Manifest& m = e->manifest();
    NodeExpert x;
    x.name = e->name();
    x.description = m.description;
    x.keywords = m.keywords;
    x.examples = m.examples;
    x.capacity = m.capacity;
    x.inflight = e->inflight();
    x.quarantined = e->quarantined();
    me.experts.push_back(std::move(x));
  }
  return me;
}

// One heartbeat: this node's row, the lost nodes reaped, the trainer's role, the view of
// the others that routing uses.
void Cluster::Beat() {
  bool was_lost = false;
  const double mono = Env::Default()->MonotonicMicros() / 1e6;
  if (Status st = link_->Heartbeat(Me(), &was_lost); !st.ok()) {
    LogWarnRepeating("cluster: heartbeat: {}", st.message());
    healthy_since_ = -1;
    return;
  }
  if (healthy_since_ < 0) healthy_since_ = mono;
  const double now = Env::Default()->NowUnix();
  was_lost |= !joined_ && options_.was_lost;
  if (!joined_ || was_lost) {
    const std::string what =
        was_lost ? "back after the others declared it lost (its tasks were taken over then)"
                 : "joined the cluster";
    if (was_lost) LogWarn("cluster: node {} is {}", options_.node, what);
    (void)store_->RecordExpertEvent(
        {now, "", options_.node, was_lost ? "node-rejoined" : "node-joined", what});
    joined_ = true;
  }
  std::vector<std::string> lost, interrupted;
  if (mono - healthy_since_ >= options_.timeout_s)
    if (Status st = link_->ReapLost(options_.timeout_s, &lost, &interrupted); !st.ok())
      LogWarnRepeating("cluster: {}", st.message());
  if (!interrupted.empty()) {
    pipeline_->RemoteEnded(interrupted);
    link_->NotifyEnded(interrupted);
  }
  if (!lost.empty()) {
    shared_work_ = true;
    link_->NotifyWork("");
  }
  trainer_ = link_->Trainer();
  std::vector<NodeInfo> nodes;
  if (Status st = link_->Nodes(options_.timeout_s, &nodes); !st.ok()) {
    LogWarnRepeating("cluster: {}", st.message());
    return;
  }
  // Routing sees the experts the other live nodes host, with their load summed.
  struct Sum {
    RemoteExpert x;
    int inflight = 0, capacity = 0;
  };
  std::map<std::string, Sum> remote;
  for (const NodeInfo& n : nodes) {
    if (!n.alive || n.node == options_.node) continue;
    for (const NodeExpert& e : n.experts) {
      if (e.quarantined) continue;
      Sum& s = remote[e.name];
      s.x.name = e.name;
      s.x.description = e.description;
      s.x.keywords = e.keywords;
      s.x.examples = e.examples;
      s.inflight += e.inflight;
      s.capacity += std::max(1, e.capacity);
    }
  }
  std::vector<RemoteExpert> view;
  for (auto& [name, s] : remote) {
    s.x.load = std::min(1.0, s.inflight / static_cast<double>(std::max(1, s.capacity)));
    view.push_back(std::move(s.x));
  }
  pipeline_->SetRemote(std::move(view));
  std::lock_guard<std::mutex> l(view_mu_);
  nodes_ = std::move(nodes);
}

void Cluster::HeartbeatLoop() {
  std::unique_lock<std::mutex> l(mu_);
  while (!stop_.load()) {
    cv_.wait_for(l, std::chrono::milliseconds(static_cast<int64_t>(options_.heartbeat_s * 1000)),
                 [&] { return stop_.load(); });
    if (stop_.load()) return;
    l.unlock();
    Beat();
    // A backstop, not the main path (that is NOTIFY): a notification lost with a broken
    // connection costs at most a heartbeat's wait.
    ClaimWork();
    l.lock();
  }
}

void Cluster::ListenLoop() {
  while (!stop_.load()) {
    ClusterNews news;
    if (Status st = link_->Wait(1.0, &news); !st.ok()) {
      LogWarnRepeating("cluster: {}", st.message());
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait_for(l, std::chrono::seconds(1), [&] { return stop_.load(); });
      continue;
    }
    if (!news.ended.empty()) pipeline_->RemoteEnded(news.ended);
    for (const auto& id : news.cancel) pipeline_->CancelHere(id);
    if (news.model) on_model_();
    if (news.work) {
      shared_work_ = true;
      ClaimWork();
    }
  }
}

// Sends what the pipeline told (work handed on, tasks ended) in batches, off its threads,
// and claims when a slot came free while the shared queue had work.
void Cluster::NotifyLoop() {
  while (true) {
    std::vector<std::string> ended, released;
    bool claim;
    {
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait(l,
               [&] { return stop_.load() || !ended_.empty() || !released_.empty() || claim_due_; });
      if (stop_.load()) return;
      ended.swap(ended_);
      released.swap(released_);
      claim = std::exchange(claim_due_, false);
    }
    if (!ended.empty()) link_->NotifyEnded(ended);
    for (const auto& e : std::set<std::string>(released.begin(), released.end()))
      link_->NotifyWork(e);
    if (claim) ClaimWork();
  }
}

void Cluster::Released(const std::vector<std::string>& experts) {
  {
    std::lock_guard<std::mutex> l(mu_);
    released_.insert(released_.end(), experts.begin(), experts.end());
  }
  cv_.notify_all();
}

void Cluster::Ended(const std::string& id) {
  {
    std::lock_guard<std::mutex> l(mu_);
    ended_.push_back(id);
  }
  cv_.notify_all();
}

Status Cluster::CancelElsewhere(const std::string& id) {
  std::string owner;
  Status st = store_->CancelShared(id, Env::Default()->NowUnix(), &owner);
  if (st.ok()) {  // it was in the shared queue: it never runs
    LogInfo("task {} cancelled (it waited in the shared queue)", id);
    Ended(id);
    return Status::OK();
  }
  if (st.code() != Status::Code::kFailedPrecondition || owner.empty()) return st;
  link_->NotifyCancel(id);  // its node stops it (a running attempt is asked to stop)
  return Status::OK();
}

void Cluster::SlotFreed() {
  if (!shared_work_.load()) return;  // nothing seen in the shared queue: no query
  {
    std::lock_guard<std::mutex> l(mu_);
    claim_due_ = true;
  }
  cv_.notify_all();
}

// Claims from the shared queue what the local experts have room for, and tasks waiting
// to be routed while the local queue is short.
void Cluster::ClaimWork() {
  if (stop_.load()) return;
  std::lock_guard<std::mutex> one(claim_mu_);
  bool more = false;
  auto adopt = [&](const std::string& expert, int n) {
    std::vector<std::string> ids;
    if (Status st = link_->Claim(expert, n, &ids); !st.ok()) {
      LogWarnRepeating("cluster: {}", st.message());
      return;
    }
    if (static_cast<int>(ids.size()) == n) more = true;  // there may be more behind
    std::vector<Task> tasks;
    for (const auto& id : ids) {
      Task t;
      if (Status st = store_->GetTask(id, &t); st.ok())
        tasks.push_back(std::move(t));
      else
        LogError("cluster: claimed task {} cannot be read ({}); it stays this node's", id,
                 st.ToString());
    }
    if (!tasks.empty()) {
      LogDebug("cluster: claimed {} task(s) for {}", tasks.size(),
               expert.empty() ? "routing" : expert);
      pipeline_->Adopt(std::move(tasks), expert);
    }
  };
  for (const auto& [expert, free] : pipeline_->FreeSlots()) adopt(expert, free);
  if (pipeline_->QueueDepth() < 64) adopt("", 64);
  shared_work_ = more;
}

std::string Cluster::TrainerNode() {
  std::lock_guard<std::mutex> l(view_mu_);
  for (const NodeInfo& n : nodes_)
    if (n.alive && n.trainer) return n.node;
  return trainer_.load() ? options_.node : "";
}

void Cluster::ModelChanged(int version) { link_->NotifyModel(version); }

json Cluster::Nodes() {
  std::lock_guard<std::mutex> l(view_mu_);
  json a = json::array();
  for (const NodeInfo& n : nodes_) {
    json experts = json::array();
    for (const NodeExpert& e : n.experts) experts.push_back(e.name);
    a.push_back(
        {{"node", n.node},
         {"alive", n.alive},
         {"heartbeat_at", n.heartbeat_at > 0 ? json(wire::IsoTime(n.heartbeat_at)) : json(nullptr)},
         {"trainer", n.alive && n.trainer},
         {"socket", n.socket},
         {"pid", n.pid},
         {"experts", experts}});
  }
  return a;
}

json Cluster::RemoteExperts() {
  std::lock_guard<std::mutex> l(view_mu_);
  json a = json::array();
  for (const NodeInfo& n : nodes_) {
    if (!n.alive || n.node == options_.node) continue;
    for (const NodeExpert& e : n.experts)
      a.push_back({{"name", e.name},
                   {"node", n.node},
                   {"state", e.quarantined ? "quarantined" : "active"},
                   {"description", e.description},
                   {"keywords", e.keywords},
                   {"inflight", e.inflight},
                   {"capacity", e.capacity}});
  }
  return a;
}

}  // namespace cortex
