// The cluster's shared state in PostgreSQL (cortex/cluster.h): one connection for the
// heartbeat, claims, locks and notifications, one that only LISTENs. Times are the
// server's clock, so nodes' clocks never have to agree.
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <mutex>
#include <nlohmann/json.hpp>

#include "cortex/cluster.h"
#include "cortex/log.h"
#include "cortex/store_url.h"
#include "pg.h"

namespace cortex {
namespace {

using json = nlohmann::json;
using pg::Param;

// Advisory lock keys ('CRTX' and a number): a node's name (with the name's hash as the
// second key), and the trainer's role.
constexpr int kNodeLock = 0x43525403;
constexpr long kTrainerLock = 0x4352545803L;
const char* const kWork = "cortex_work";
const char* const kEnded = "cortex_ended";
const char* const kModel = "cortex_model";
const char* const kCancel = "cortex_cancel";
#define CORTEX_NOW "extract(epoch from clock_timestamp())"

class PgCluster : public ClusterLink {
 public:
  PgCluster(std::string url, std::string node)
      : url_(std::move(url)), shown_(RedactUrl(url_)), node_(std::move(node)) {}
  ~PgCluster() override {
    if (wake_fd_ >= 0) ::close(wake_fd_);
  }

  Status Open() {
    wake_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (wake_fd_ < 0) return Status::IOError("cannot make an eventfd");
    std::lock_guard<std::mutex> l(mu_);
    CORTEX_RETURN_IF_ERROR(ConnectLocked());
    std::lock_guard<std::mutex> k(listen_mu_);
    return ListenLocked();
  }

  Status Heartbeat(const NodeInfo& me, bool* was_lost) override {
    json experts = json::array();
    for (const NodeExpert& e : me.experts)
      experts.push_back({{"name", e.name},
                         {"description", e.description},
                         {"keywords", e.keywords},
                         {"examples", e.examples},
                         {"capacity", e.capacity},
                         {"inflight", e.inflight},
                         {"quarantined", e.quarantined}});
    std::lock_guard<std::mutex> l(mu_);
    CORTEX_RETURN_IF_ERROR(ReadyLocked());
    CORTEX_RETURN_IF_ERROR(c_.Exec("BEGIN").status());
    pg::Result was =
        c_.Query("SELECT lost AND heartbeat_at>0 FROM nodes WHERE name=$1 FOR UPDATE", {node_});
    pg::Result up = c_.Query(
        "INSERT INTO nodes(name,socket,pid,started_at,heartbeat_at,lost,trainer,experts) "
        "VALUES($1,$2,$3,$4," CORTEX_NOW
        ",false,$5,$6::jsonb) ON CONFLICT(name) DO UPDATE SET "
        "socket=EXCLUDED.socket,pid=EXCLUDED.pid,started_at=EXCLUDED.started_at,"
        "heartbeat_at=EXCLUDED.heartbeat_at,lost=false,trainer=EXCLUDED.trainer,"
        "experts=EXCLUDED.experts",
        {node_, me.socket, me.pid, me.started_at, trainer_, experts.dump()});
    for (const pg::Result* r : {&was, &up})
      if (!r->ok()) {
        (void)c_.Exec("ROLLBACK");
        return r->status().WithContext("cluster heartbeat");
      }
    *was_lost = was.rows() > 0 && was.Bool(0, 0);
    return c_.Exec("COMMIT").status().WithContext("cluster heartbeat");
  }

  Status ReapLost(double timeout_s, std::vector<std::string>* lost,
                  std::vector<std::string>* interrupted) override {
    lost->clear();
    interrupted->clear();
    std::lock_guard<std::mutex> l(mu_);
    CORTEX_RETURN_IF_ERROR(ReadyLocked());
    CORTEX_RETURN_IF_ERROR(c_.Exec("BEGIN").status());
    // The row's lock decides: a node that heartbeats at this moment is either seen fresh
    // here or finds itself declared lost afterwards, never both.
    pg::Result r = c_.Query(
        "UPDATE nodes SET lost=true,trainer=false WHERE NOT lost AND name<>$1 "
        "AND heartbeat_at<" CORTEX_NOW "-$2 RETURNING name",
        {node_, timeout_s});
    Status st = r.status();
    for (int i = 0; st.ok() && i < r.rows(); ++i) {
      const std::string gone = r.Text(i, 0);
      const std::string why = "node " + gone + " was lost while this attempt ran";
      pg::Result a =
          c_.Query("UPDATE attempts SET outcome='interrupted',finished_at=greatest(" CORTEX_NOW
                   ",started_at),quality=0,error=$1 WHERE outcome IS NULL AND task_id IN (SELECT "
                   "id FROM tasks "
                   "WHERE node=$2 AND state='running')",
                   {why, gone});
      pg::Result t =
          c_.Query("UPDATE tasks SET state='interrupted',updated_at=greatest(" CORTEX_NOW
                   ",created_at),routing=false WHERE node=$1 AND state='running' RETURNING id",
                   {gone});
      pg::Result q = c_.Query(
          "UPDATE tasks SET node=NULL,routing=false WHERE node=$1 AND state IN ('queued','routed')",
          {gone});
      for (const pg::Result* x : {&a, &t, &q})
        if (st.ok() && !x->ok()) st = x->status();
      if (!st.ok()) break;
      for (int k = 0; k < t.rows(); ++k) interrupted->push_back(t.Text(k, 0));
      const std::string detail = "no heartbeat for " + std::to_string(static_cast<int>(timeout_s)) +
                                 "s: " + std::to_string(t.rows()) +
                                 " running task(s) interrupted, " + std::to_string(q.Affected()) +
                                 " returned to the shared queue (declared by " + node_ + ")";
      st = c_.Query(
                 "INSERT INTO expert_events(time,expert,file,event,detail) "
                 "VALUES(" CORTEX_NOW ",'',$1,'node-lost',$2)",
                 {gone, detail})
               .status();
      lost->push_back(gone);
      LogWarn("cluster: node {} declared lost: {}", gone, detail);
    }
    if (!st.ok()) {
      (void)c_.Exec("ROLLBACK");
      lost->clear();
      interrupted->clear();
      return st.WithContext("declaring lost nodes");
    }
    return c_.Exec("COMMIT").status();
  }

  Status Nodes(double timeout_s, std::vector<NodeInfo>* out) override {
    out->clear();
    std::lock_guard<std::mutex> l(mu_);
    CORTEX_RETURN_IF_ERROR(ReadyLocked());
    pg::Result r = c_.Query(
        "SELECT name,socket,pid,started_at,heartbeat_at,trainer,experts,"
        "(NOT lost AND heartbeat_at>=" CORTEX_NOW "-$1) FROM nodes ORDER BY name",
        {timeout_s});
    CORTEX_RETURN_IF_ERROR(r.status().WithContext("listing nodes"));
    for (int i = 0; i < r.rows(); ++i) {
      NodeInfo n;
      n.node = r.Text(i, 0);
      n.socket = r.Text(i, 1);
      n.pid = static_cast<int>(r.Long(i, 2));
      n.started_at = r.Double(i, 3);
      n.heartbeat_at = r.Double(i, 4);
      n.trainer = r.Bool(i, 5);
      n.alive = r.Bool(i, 7);
      json ex = json::parse(r.Text(i, 6), nullptr, false);
      if (ex.is_array())
        for (const auto& e : ex) {
          if (!e.is_object()) continue;
          NodeExpert x;
          x.name = e.value("name", "");
          x.description = e.value("description", "");
          x.keywords = e.value("keywords", std::vector<std::string>{});
          x.examples = e.value("examples", std::vector<std::string>{});
          x.capacity = e.value("capacity", 1);
          x.inflight = e.value("inflight", 0);
          x.quarantined = e.value("quarantined", false);
          n.experts.push_back(std::move(x));
        }
      out->push_back(std::move(n));
    }
    return Status::OK();
  }

  Status Claim(const std::string& expert, int n, std::vector<std::string>* ids) override {
    ids->clear();
    if (n <= 0) return Status::OK();
    std::lock_guard<std::mutex> l(mu_);
    CORTEX_RETURN_IF_ERROR(ReadyLocked());
    pg::Result r =
        expert.empty()
            ? c_.Query(
                  "UPDATE tasks SET node=$1 WHERE id IN (SELECT id FROM tasks WHERE node IS "
                  "NULL AND want IS NULL AND state IN ('queued','routed') ORDER BY "
                  "created_at LIMIT $2 FOR UPDATE SKIP LOCKED) AND node IS NULL RETURNING id",
                  {node_, n})
            : c_.Query(
                  "UPDATE tasks SET node=$1 WHERE id IN (SELECT id FROM tasks WHERE node IS "
                  "NULL AND want=$3 AND state IN ('queued','routed') ORDER BY created_at "
                  "LIMIT $2 FOR UPDATE SKIP LOCKED) AND node IS NULL RETURNING id",
                  {node_, n, expert});
    CORTEX_RETURN_IF_ERROR(r.status().WithContext("claiming work"));
    for (int i = 0; i < r.rows(); ++i) ids->push_back(r.Text(i, 0));
    return Status::OK();
  }

  bool Trainer() override {
    std::lock_guard<std::mutex> l(mu_);
    if (!ReadyLocked().ok()) return false;
    if (!trainer_) {
      pg::Result r = c_.Query("SELECT pg_try_advisory_lock($1)", {kTrainerLock});
      trainer_ = r.ok() && r.Bool(0, 0);
      if (trainer_) LogInfo("cluster: node {} is the trainer now", node_);
    }
    return trainer_;
  }

  Status Leave(int* handed) override {
    *handed = 0;
    std::lock_guard<std::mutex> l(mu_);
    CORTEX_RETURN_IF_ERROR(ReadyLocked());
    CORTEX_RETURN_IF_ERROR(c_.Exec("BEGIN").status());
    pg::Result t = c_.Query(
        "UPDATE tasks SET node=NULL,routing=false WHERE node=$1 AND state IN ('queued','routed')",
        {node_});
    // heartbeat_at 0: gone on purpose (a start says "rejoined", not "was declared lost").
    pg::Result n =
        c_.Query("UPDATE nodes SET lost=true,trainer=false,heartbeat_at=0 WHERE name=$1", {node_});
    pg::Result e =
        c_.Query("INSERT INTO expert_events(time,expert,file,event,detail) VALUES(" CORTEX_NOW
                 ",'',$1,'node-left',$2)",
                 {node_, "stopped; " + std::to_string(t.ok() ? t.Affected() : 0) +
                             " unstarted task(s) handed to the shared queue"});
    for (const pg::Result* x : {&t, &n, &e})
      if (!x->ok()) {
        (void)c_.Exec("ROLLBACK");
        return x->status();
      }
    CORTEX_RETURN_IF_ERROR(c_.Exec("COMMIT").status());
    *handed = static_cast<int>(t.Affected());
    if (trainer_) (void)c_.Query("SELECT pg_advisory_unlock($1)", {kTrainerLock});
    trainer_ = false;
    if (*handed) (void)c_.Query("SELECT pg_notify($1,'')", {kWork});
    return Status::OK();
  }

  void NotifyWork(const std::string& expert) override { Notify(kWork, expert); }
  void NotifyEnded(const std::vector<std::string>& ids) override {
    std::string batch;
    for (const auto& id : ids) {
      if (batch.size() + id.size() + 1 > 7000) {  // a payload holds under 8000 bytes
        Notify(kEnded, batch);
        batch.clear();
      }
      batch += (batch.empty() ? "" : ",") + id;
    }
    if (!batch.empty()) Notify(kEnded, batch);
  }
  void NotifyModel(int version) override { Notify(kModel, std::to_string(version)); }
  void NotifyCancel(const std::string& id) override { Notify(kCancel, id); }

  Status Wait(double timeout_s, ClusterNews* out) override {
    *out = ClusterNews{};
    std::lock_guard<std::mutex> k(listen_mu_);
    if (listen_.Broken()) {
      // Reconnected, it listens again; what was sent meanwhile is lost, so it says there
      // may be work (the caller claims) and ends (the caller checks its waiters).
      listen_.Close();
      CORTEX_RETURN_IF_ERROR(ListenLocked());
      out->work = true;
      out->model = true;
      return Status::OK();
    }
    pollfd fds[2] = {{PQsocket(listen_.raw()), POLLIN, 0}, {wake_fd_, POLLIN, 0}};
    if (!Drain(out)) (void)::poll(fds, 2, static_cast<int>(timeout_s * 1000));
    if (fds[1].revents & POLLIN) {
      uint64_t v;
      (void)!::read(wake_fd_, &v, sizeof v);
    }
    if (PQconsumeInput(listen_.raw()) == 0)
      return Status::IOError("the listening connection broke: " + listen_.Error());
    Drain(out);
    return Status::OK();
  }

  void Interrupt() override {
    uint64_t one = 1;
    (void)!::write(wake_fd_, &one, sizeof one);
  }

 private:
  // The notifications already received; whether there were any.
  bool Drain(ClusterNews* out) {
    bool any = false;
    while (PGnotify* n = PQnotifies(listen_.raw())) {
      any = true;
      const std::string channel = n->relname, payload = n->extra ? n->extra : "";
      if (channel == kWork) {
        out->work = true;
      } else if (channel == kModel) {
        out->model = true;
      } else if (channel == kCancel) {
        out->cancel.push_back(payload);
      } else if (channel == kEnded) {
        size_t start = 0;
        while (start <= payload.size()) {
          size_t comma = payload.find(',', start);
          if (comma == std::string::npos) comma = payload.size();
          if (comma > start) out->ended.push_back(payload.substr(start, comma - start));
          start = comma + 1;
        }
      }
      PQfreemem(n);
    }
    return any;
  }

  void Notify(const char* channel, const std::string& payload) {
    std::lock_guard<std::mutex> l(mu_);
    if (!ReadyLocked().ok()) return;  // the others' periodic claim covers a lost one
    pg::Result r = c_.Query("SELECT pg_notify($1,$2)", {channel, payload});
    if (!r.ok()) LogWarnRepeating("cluster: cannot notify {}: {}", channel, r.status().message());
  }

  Status ConnectLocked() {
    CORTEX_RETURN_IF_ERROR(c_.Connect(url_, "cluster " + node_, /*short_transactions=*/true));
    trainer_ = false;  // (a session's locks end with it)
    // One live cortexd per node name: its connection holds the name's lock.
    pg::Result r = c_.Query("SELECT pg_try_advisory_lock($1,hashtext($2))", {kNodeLock, node_});
    CORTEX_RETURN_IF_ERROR(r.status());
    if (!r.Bool(0, 0)) {
      c_.Close();
      return Status::FailedPrecondition("another cortexd is node " + node_ + " of the cluster at " +
                                        shown_ + "; give this one another daemon.node");
    }
    return Status::OK();
  }

  // The main connection is up; reconnected (and the name's lock taken again) if it broke.
  Status ReadyLocked() {
    if (!c_.Broken()) return Status::OK();
    Status st = ConnectLocked();
    if (st.ok()) LogWarn("cluster: node {} reconnected to {}", node_, shown_);
    return st;
  }

  Status ListenLocked() {
    CORTEX_RETURN_IF_ERROR(listen_.Connect(url_, "cluster listener " + node_));
    std::string sql;
    for (const char* channel : {kWork, kEnded, kModel, kCancel})
      sql += std::string("LISTEN ") + channel + ";";
    return listen_.Exec(sql.c_str()).status();
  }

  const std::string url_, shown_, node_;
  std::mutex mu_;  // c_ and trainer_
  pg::Conn c_;
  bool trainer_ = false;
  std::mutex listen_mu_;
  pg::Conn listen_;
  int wake_fd_ = -1;
};

}  // namespace

Result<std::unique_ptr<ClusterLink>> OpenClusterLink(const std::string& url,
                                                     const std::string& node) {
  auto c = std::make_unique<PgCluster>(url, node);
  Status st = c->Open();
  if (!st.ok()) return st;
  return std::unique_ptr<ClusterLink>(std::move(c));
}

}  // namespace cortex
