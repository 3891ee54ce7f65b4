// A cluster end to end: three real cortexd nodes on one machine sharing the tests'
// PostgreSQL server, driven by cortexctl and raw clients (docs/CLUSTER.md).
#include <gtest/gtest.h>
#include <libpq-fe.h>
#include <signal.h>

#include <atomic>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include "cortex/client.h"
#include "pg/pg_server.h"
#include "testutil.h"

namespace cortex {
namespace {

using test::Daemon;
using test::TempDir;
using json = nlohmann::json;

// One node: its own folder, socket and name, the cluster's database, `experts_yaml`.
std::unique_ptr<Daemon> Node(const TempDir& dir, const std::string& name, const std::string& url,
                             const std::string& experts_yaml) {
  auto d = std::make_unique<Daemon>(
      dir, experts_yaml,
      "router: {exploration: 0, seed: 1, load_bias: 0}\ntraining: {online: false, "
      "interval: 1h, min_new_outcomes: 100000}\n",
      /*bundled=*/true);
  std::string c = test::ReadFile(d->config);
  c.erase(0, c.find('\n') + 1);  // its own daemon section: the node's name, a short timeout
  c = "daemon: {socket: " + d->socket + ", workers: 4, shutdown_grace: 2s, node: " + name +
      ", node_timeout: 3s}\n" + c;
  test::WriteFile(d->config, c);
  d->UseStoreUrl(url);
  return d;
}

// A command expert `name` that appends "<task id> <node>" to `runs`, on `node`.
std::string Recording(const std::string& name, const std::string& node, const std::string& runs,
                      const std::string& keywords, int capacity = 2) {
  return "  - name: " + name +
         "\n    plugin: command\n    run: [/bin/sh, -c, 'echo \"$CORTEX_TASK_ID " + node +
         "\" >> " + runs + "; sleep 0.05']\n    capacity: " + std::to_string(capacity) +
         "\n    keywords: [" + keywords + "]\n";
}

// Lines of `runs` by task id: the nodes that ran each.
std::map<std::string, std::vector<std::string>> Runs(const std::string& runs) {
  std::map<std::string, std::vector<std::string>> out;
  std::ifstream in(runs);
  std::string id, node;
  while (in >> id >> node) out[id].push_back(node);
  return out;
}

// Task states straight from the database, for the ids given.
std::map<std::string, std::string> States(const std::string& url,
                                          const std::set<std::string>& ids) {
  std::map<std::string, std::string> out;
  PGconn* c = PQconnectdb(url.c_str());
  PGresult* r = PQexec(c, "SELECT id,state FROM tasks");
  for (int i = 0; i < PQntuples(r); ++i)
    if (ids.count(PQgetvalue(r, i, 0))) out[PQgetvalue(r, i, 0)] = PQgetvalue(r, i, 1);
  PQclear(r);
  PQfinish(c);
  return out;
}

class ClusterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    test::PgServer* pg = test::PgServer::Get(&why);
    if (!pg) GTEST_SKIP() << "no PostgreSQL server: " << why;
    url_ = pg->NewDatabase();
    ASSERT_FALSE(url_.empty());
  }
  std::string url_;
  TempDir dirs_[3];
  TempDir shared_;
};

// Work submitted to one node runs on the node that hosts its expert; the submitter's wait
// ends with it; every node sees every node, its experts, and the task.
TEST_F(ClusterTest, WorkSubmittedToOneNodeRunsOnTheNodeThatHostsItsExpert) {
  const std::string runs = shared_ / "runs";
  auto a = Node(dirs_[0], "a", url_, "experts:\n" + Recording("alpha", "a", runs, "alpha, apple"));
  auto b = Node(dirs_[1], "b", url_,
                "experts:\n" + Recording("beta", "b", runs, "beta, banana") +
                    "  - name: slow\n    plugin: command\n    run: [/bin/sh, -c, 'echo "
                    "\"$CORTEX_TASK_ID b\" >> " +
                    runs + "; sleep 5']\n    capacity: 1\n    keywords: [snail, slowly]\n");
  auto c = Node(dirs_[2], "c", url_, "experts:\n" + Recording("gamma", "c", runs, "gamma, grape"));
  for (auto* d : {a.get(), b.get(), c.get()}) ASSERT_TRUE(d->Start()) << d->Log();
  // Each node sees the three and their experts (a heartbeat or two after the last start).
  ASSERT_TRUE(test::Eventually([&] {
    for (auto* d : {a.get(), b.get(), c.get()}) {
      json st = d->CtlJson({"status"});
      if (!st["nodes"].is_array() || st["nodes"].size() != 3) return false;
      for (const auto& n : st["nodes"])
        if (!n["alive"].get<bool>()) return false;
      std::set<std::string> seen;
      for (const auto& e : d->CtlJson({"experts"})) seen.insert(e["name"].get<std::string>());
      for (const char* x : {"alpha", "beta", "gamma", "slow"})
        if (!seen.count(x)) return false;
    }
    return true;
  })) << a->CtlJson({"status"}).dump();
  // Routing on a sees b's expert: a task for it goes there, and the wait on a ends.
  test::Run r = a->Ctl({"submit", "--wait", "peel the banana for beta", "--json"});
  ASSERT_EQ(r.code, 0) << r.out << r.err << a->Log() << b->Log();
  const std::string id = r.Json().value("id", "");
  EXPECT_EQ(r.Json()["state"], "succeeded") << r.out;
  auto ran = Runs(runs);
  ASSERT_EQ(ran[id].size(), 1u) << test::ReadFile(runs);
  EXPECT_EQ(ran[id][0], "b");
  // Any node shows it, and the history of every node's tasks.
  json t = c->CtlJson({"show", id});
  EXPECT_EQ(t["state"], "succeeded") << t.dump();
  EXPECT_EQ(t["attempts"][0]["expert"], "beta");
  EXPECT_EQ(c->CtlJson({"history"}).size(), 1u);
  // `experts` on a lists every instance with its node.
  std::map<std::string, std::string> where;
  for (const auto& e : a->CtlJson({"experts"}))
    if (e["name"] == "alpha" || e["name"] == "beta" || e["name"] == "gamma")
      where[e["name"]] = e["node"];
  EXPECT_EQ(where,
            (std::map<std::string, std::string>{{"alpha", "a"}, {"beta", "b"}, {"gamma", "c"}}));
  test::Run text = a->Ctl({"status"});
  EXPECT_NE(text.out.find("cluster:   node a of 3"), std::string::npos) << text.out;
  // Cancel from any node: one running on b is stopped there; one waiting in the shared
  // queue (b's one slow slot is taken) never runs.
  const std::string running = a->Ctl({"submit", "go slowly, snail"}).out.substr(0, 12);
  ASSERT_TRUE(test::Eventually([&] {
    return c->CtlJson({"show", running})["state"] == "running";
  }));
  const std::string waiting = a->Ctl({"submit", "another snail, slowly"}).out.substr(0, 12);
  ASSERT_TRUE(test::Eventually([&] { return c->CtlJson({"show", waiting})["state"] == "routed"; }));
  test::Run cw = c->Ctl({"cancel", waiting});
  EXPECT_EQ(cw.code, 0) << cw.out << cw.err;
  EXPECT_EQ(c->CtlJson({"show", waiting})["state"], "cancelled");
  test::Run cr = a->Ctl({"cancel", running});  // (from its submitter: b runs it)
  EXPECT_EQ(cr.code, 0) << cr.out << cr.err;
  ASSERT_TRUE(test::Eventually([&] {
    return a->CtlJson({"show", running})["state"] == "cancelled";
  })) << a->CtlJson({"show", running}).dump();
  EXPECT_EQ(Runs(runs).count(waiting), 0u) << "a cancelled task in the shared queue never runs";
  // A task for a's own expert stays on a.
  r = b->Ctl({"submit", "--wait", "an apple for alpha", "--json"});
  ASSERT_EQ(r.code, 0) << r.out << r.err;
  EXPECT_EQ(Runs(runs)[r.Json().value("id", "")], std::vector<std::string>{"a"});
  for (auto* d : {a.get(), b.get(), c.get()}) EXPECT_EQ(d->Stop(SIGTERM), 0) << d->Log();
}

// Fallback moves a task to another node's expert: the first pick (on a) fails, the next
// candidate is hosted only on b, where the task ends.
TEST_F(ClusterTest, AFallbackMovesTheTaskToAnotherNodesExpert) {
  const std::string runs = shared_ / "runs";
  auto a = Node(dirs_[0], "a", url_,
                "experts:\n  - name: flaky\n    plugin: command\n    run: [/bin/sh, -c, 'echo "
                "\"$CORTEX_TASK_ID a\" >> " +
                    runs + "; exit 3']\n    keywords: [deploy, release, rollout]\n");
  auto b = Node(dirs_[1], "b", url_, "experts:\n" + Recording("backup", "b", runs, "deploy"));
  for (auto* d : {a.get(), b.get()}) ASSERT_TRUE(d->Start()) << d->Log();
  ASSERT_TRUE(test::Eventually([&] {
    for (const auto& e : a->CtlJson({"experts"}))
      if (e["name"] == "backup") return true;
    return false;
  }));
  test::Run r = a->Ctl({"submit", "--wait", "deploy the release rollout", "--json"});
  ASSERT_EQ(r.code, 0) << r.out << r.err << a->Log();
  const std::string id = r.Json().value("id", "");
  json t = b->CtlJson({"show", id});
  ASSERT_EQ(t["attempts"].size(), 2u) << t.dump();
  EXPECT_EQ(t["attempts"][0]["expert"], "flaky");
  EXPECT_EQ(t["attempts"][1]["expert"], "backup");
  EXPECT_EQ(t["state"], "succeeded");
  EXPECT_EQ(Runs(runs)[id], (std::vector<std::string>{"a", "b"}));
  for (auto* d : {a.get(), b.get()}) EXPECT_EQ(d->Stop(SIGTERM), 0) << d->Log();
}

// SIGKILL one of three nodes under load from 8 submitters: every acknowledged task is in
// the database and ends (succeeded, or interrupted if it was running on the dead node);
// none runs twice; the others declare the node lost and say so.
TEST_F(ClusterTest, KillingANodeUnderLoadLosesNothingAndRunsNothingTwice) {
  const std::string runs = shared_ / "runs";
  std::unique_ptr<Daemon> nodes[3];
  const char* names[3] = {"a", "b", "c"};
  for (int i = 0; i < 3; ++i) {
    nodes[i] =
        Node(dirs_[i], names[i], url_, "experts:\n" + Recording("work", names[i], runs, "job"));
    ASSERT_TRUE(nodes[i]->Start()) << nodes[i]->Log();
  }
  std::set<std::string> acked;
  std::mutex mu;
  std::atomic<bool> stop{false}, b_dead{false};
  std::vector<std::thread> clients;
  for (int c = 0; c < 8; ++c)
    clients.emplace_back([&, c] {
      for (int i = 0; !stop.load(); ++i) {
        int target = (c + i) % 3;
        if (target == 1 && b_dead.load()) target = c % 2 == 0 ? 0 : 2;
        Client cl;
        if (!cl.Connect(nodes[target]->socket).ok()) continue;
        json resp;
        json req = {{"op", "submit"},
                    {"text", "job " + std::to_string(c) + "-" + std::to_string(i)}};
        if (cl.Call(req, &resp).ok() && resp.value("ok", false)) {
          std::lock_guard<std::mutex> l(mu);
          acked.insert(resp["result"]["id"].get<std::string>());
        }
        usleep(4000);
      }
    });
  auto count = [&] {
    std::lock_guard<std::mutex> l(mu);
    return acked.size();
  };
  ASSERT_TRUE(test::Eventually([&] { return count() >= 120; }, 60));
  nodes[1]->Stop(SIGKILL);
  b_dead = true;
  const size_t at_kill = count();
  ASSERT_TRUE(test::Eventually([&] { return count() >= at_kill + 120; }, 60));
  stop = true;
  for (auto& t : clients) t.join();

  // Every acknowledged task ends on the live nodes: none is lost or left hanging.
  std::map<std::string, std::string> states;
  ASSERT_TRUE(test::Eventually(
      [&] {
        states = States(url_, acked);
        if (states.size() != acked.size()) return false;
        for (const auto& [id, s] : states)
          if (s != "succeeded" && s != "interrupted" && s != "failed") return false;
        return true;
      },
      90))
      << states.size() << " of " << acked.size() << " in the database";
  std::map<std::string, int> by_state;
  for (const auto& [id, s] : states) ++by_state[s];
  auto ran = Runs(runs);
  size_t twice = 0, never = 0;
  for (const auto& id : acked) {
    const size_t n = ran.count(id) ? ran[id].size() : 0;
    if (n > 1) ++twice;
    if (n == 0 && states[id] == "succeeded") ++never;
  }
  std::printf(
      "acknowledged %zu (%zu before the kill); lost %zu; run twice %zu; succeeded %d, "
      "interrupted %d, failed %d\n",
      acked.size(), at_kill, acked.size() - states.size(), twice, by_state["succeeded"],
      by_state["interrupted"], by_state["failed"]);
  EXPECT_EQ(twice, 0u);
  EXPECT_EQ(never, 0u);
  std::string a_failed;
  for (const auto& [id, s] : states)
    if (s == "failed") a_failed = id;
  EXPECT_EQ(by_state["failed"], 0) << nodes[0]->CtlJson({"show", a_failed}).dump();
  EXPECT_EQ(by_state["succeeded"] + by_state["interrupted"], static_cast<int>(acked.size()));
  // The survivors said so, and show b as gone.
  bool told = false;
  for (const auto& e : nodes[0]->CtlJson({"events", "--limit", "200"}))
    told |= e["event"] == "node-lost" && e["file"] == "b";
  EXPECT_TRUE(told);
  const json status_c = nodes[2]->CtlJson({"status"});
  for (const auto& n : status_c["nodes"])
    if (n["node"] == "b") {
      EXPECT_FALSE(n["alive"].get<bool>());
    }
  // Back, b rejoins and runs work again.
  nodes[1] = Node(dirs_[1], "b", url_, "experts:\n" + Recording("work", "b", runs, "job"));
  ASSERT_TRUE(nodes[1]->Start()) << nodes[1]->Log();
  test::Run r = nodes[1]->Ctl({"submit", "--wait", "one more job"});
  EXPECT_EQ(r.code, 0) << r.err;
  for (auto& d : nodes) EXPECT_EQ(d->Stop(SIGTERM), 0) << d->Log();
}

// A node paused (SIGSTOP) past its timeout is declared lost while alive: the others take
// its work over; woken, it drops what is no longer its own (nothing runs twice, no slot
// stays taken) and rejoins.
TEST_F(ClusterTest, ANodePausedPastItsTimeoutComesBackWithoutRunningAnythingTwice) {
  const std::string runs = shared_ / "runs";
  auto a = Node(dirs_[0], "a", url_, "experts:\n" + Recording("work", "a", runs, "job"));
  auto b = Node(dirs_[1], "b", url_, "experts:\n" + Recording("work", "b", runs, "job"));
  for (auto* d : {a.get(), b.get()}) ASSERT_TRUE(d->Start()) << d->Log();
  std::set<std::string> acked;
  std::mutex mu;
  std::atomic<bool> stop{false};
  std::vector<std::thread> clients;
  for (int c = 0; c < 4; ++c)
    clients.emplace_back([&, c] {
      for (int i = 0; !stop.load(); ++i) {
        Client cl;
        if (!cl.Connect(b->socket).ok()) break;
        json resp;
        json req = {{"op", "submit"},
                    {"text", "job " + std::to_string(c) + "-" + std::to_string(i)}};
        if (!cl.Call(req, &resp).ok()) break;
        if (resp.value("ok", false)) {
          std::lock_guard<std::mutex> l(mu);
          acked.insert(resp["result"]["id"].get<std::string>());
        }
        usleep(10000);
      }
    });
  ASSERT_TRUE(test::Eventually([&] {
    std::lock_guard<std::mutex> l(mu);
    return acked.size() >= 60;
  }));
  stop = true;
  kill(b->pid, SIGSTOP);  // (its clients block until it wakes)
  bool told = false;
  ASSERT_TRUE(test::Eventually([&] {
    for (const auto& e : a->CtlJson({"events", "--limit", "100"}))
      told |= e["event"] == "node-lost" && e["file"] == "b";
    return told;
  }));
  sleep(1);  // a takes b's unstarted work over meanwhile
  kill(b->pid, SIGCONT);
  for (auto& t : clients) t.join();
  std::map<std::string, std::string> states;
  ASSERT_TRUE(test::Eventually(
      [&] {
        states = States(url_, acked);
        for (const auto& [id, s] : states)
          if (s != "succeeded" && s != "interrupted") return false;
        return states.size() == acked.size();
      },
      60))
      << states.size() << " of " << acked.size();
  size_t twice = 0;
  for (const auto& [id, nodes] : Runs(runs)) twice += nodes.size() > 1;
  EXPECT_EQ(twice, 0u);
  // b holds no slot for work that is not its own, rejoined, and runs new work.
  ASSERT_TRUE(test::Eventually([&] {
    for (const auto& e : b->CtlJson({"experts"}))
      if (e["name"] == "work" && e["node"] == "b") return e["inflight"] == 0;
    return false;
  })) << b->CtlJson({"experts"}).dump();
  EXPECT_EQ(b->Ctl({"submit", "--wait", "one more job"}).code, 0) << b->Log();
  for (auto* d : {a.get(), b.get()}) EXPECT_EQ(d->Stop(SIGTERM), 0) << d->Log();
}

// One node trains; a model it makes live reaches every node; when it dies another takes
// the role.
TEST_F(ClusterTest, TheTrainerRoleMovesAndALiveModelReachesEveryNode) {
  const std::string runs = shared_ / "runs";
  std::unique_ptr<Daemon> nodes[3];
  const char* names[3] = {"a", "b", "c"};
  for (int i = 0; i < 3; ++i) {
    nodes[i] = Node(dirs_[i], names[i], url_,
                    "experts:\n" + Recording("work", names[i], runs, "job") +
                        Recording("other", names[i], runs, "chore"));
    ASSERT_TRUE(nodes[i]->Start()) << nodes[i]->Log();
  }
  for (int i = 0; i < 30; ++i)
    ASSERT_EQ(nodes[i % 3]->Ctl({"submit", "--wait", i % 2 ? "a job" : "a chore"}).code, 0);
  std::string trainer;
  ASSERT_TRUE(test::Eventually([&] {
    trainer = nodes[0]->CtlJson({"status"}).value("trainer_node", "");
    return !trainer.empty();
  }));
  const int t = trainer == "a" ? 0 : trainer == "b" ? 1 : 2;
  // Another node does not train; it says which one does.
  test::Run no = nodes[(t + 1) % 3]->Ctl({"retrain", "--wait"});
  EXPECT_NE(no.code, 0);
  EXPECT_NE(no.err.find("node " + trainer + " is"), std::string::npos) << no.err;
  // The trainer does; its model, made live, is live on every node within seconds.
  test::Run yes = nodes[t]->Ctl({"retrain", "--wait", "--json"});
  ASSERT_EQ(yes.code, 0) << yes.out << yes.err << nodes[t]->Log();
  const int v = yes.Json().value("version", 0);
  ASSERT_GT(v, 0) << yes.out;
  if (!yes.Json().value("live", false)) {
    ASSERT_EQ(nodes[t]->Ctl({"models", "rollback", std::to_string(v), "--force"}).code, 0);
  }
  const std::string live = "v" + std::to_string(v);
  ASSERT_TRUE(test::Eventually([&] {
    for (auto& d : nodes)
      if (d->CtlJson({"status"})["model_version"] != live) return false;
    return true;
  })) << nodes[(t + 1) % 3]->CtlJson({"status"})["model_version"];
  // Decisions on another node name that version.
  test::Run r = nodes[(t + 2) % 3]->Ctl({"submit", "--wait", "a job", "--json"});
  ASSERT_EQ(r.code, 0);
  EXPECT_EQ(
      nodes[(t + 2) % 3]->CtlJson({"show", r.Json().value("id", "")})["decision"]["model_version"],
      live);
  // The trainer dies; one of the others takes the role.
  nodes[t]->Stop(SIGKILL);
  std::string next;
  ASSERT_TRUE(test::Eventually([&] {
    next = nodes[(t + 1) % 3]->CtlJson({"status"}).value("trainer_node", "");
    return !next.empty() && next != trainer;
  })) << next;
  test::Run again =
      nodes[next == names[(t + 1) % 3] ? (t + 1) % 3 : (t + 2) % 3]->Ctl({"retrain", "--wait"});
  EXPECT_EQ(again.code, 0) << again.err;
  for (int i = 0; i < 3; ++i)
    if (i != t) {
      EXPECT_EQ(nodes[i]->Stop(SIGTERM), 0) << nodes[i]->Log();
    }
}

// Learning in a cluster: every node follows the same activation and the same sequence of
// learning events, so a decision made on one node rebuilds bit for bit on another, and
// verdicts given on one node move routing on every node within seconds.
TEST_F(ClusterTest, FeedbackOnOneNodeMovesRoutingOnAllAndAnyNodeExplains) {
  const std::string runs = shared_ / "runs";
  std::unique_ptr<Daemon> nodes[2];
  const char* names[2] = {"a", "b"};
  for (int i = 0; i < 2; ++i) {
    nodes[i] = Node(dirs_[i], names[i], url_,
                    "experts:\n" + Recording("redis", names[i], runs, "redis, restart") +
                        Recording("web", names[i], runs, "web, page"));
    std::string c = test::ReadFile(nodes[i]->config);
    c.replace(c.find("online: false"), 13, "online: true");
    test::WriteFile(nodes[i]->config, c);
    ASSERT_TRUE(nodes[i]->Start()) << nodes[i]->Log();
  }
  std::vector<std::string> ids;
  for (int i = 0; i < 30; ++i) {
    test::Run r = nodes[i % 2]->Ctl(
        {"submit", "--wait", "--json", "--no-repo", "restart redis on host " + std::to_string(i)});
    ASSERT_EQ(r.code, 0) << r.err;
    ids.push_back(r.Json().value("id", ""));
  }
  auto steps = [&](int i) { return nodes[i]->CtlJson({"models"})["live"].value("step", -1L); };
  ASSERT_TRUE(test::Eventually([&] { return steps(0) == 30 && steps(1) == 30; }));
  auto first = [&](int i) {
    return nodes[i]->CtlJson({"route", "restart redis", "--no-repo"})["candidates"][0]["expert"];
  };
  ASSERT_EQ(first(0), "redis");
  ASSERT_EQ(first(1), "redis");
  // Both nodes hold the same weights: the same scores, and each explains the other's.
  EXPECT_EQ(nodes[0]->CtlJson({"route", "restart redis", "--no-repo"})["candidates"],
            nodes[1]->CtlJson({"route", "restart redis", "--no-repo"})["candidates"]);
  for (int i : {3, 4}) {
    json e = nodes[(i + 1) % 2]->CtlJson({"explain", ids[i]});
    EXPECT_TRUE(e.value("equal", false)) << e.dump();
  }
  // Verdicts on node a only; node b's routing moves within seconds, no retrain.
  int given = 0;
  for (; given < 30 && first(0) == "redis"; ++given) {
    ASSERT_EQ(nodes[0]->Ctl({"feedback", ids[given], "--bad"}).code, 0);
    ASSERT_TRUE(test::Eventually([&] { return steps(0) == 30 + given + 1; }));
  }
  EXPECT_LT(given, 30);
  EXPECT_TRUE(test::Eventually([&] { return first(1) != "redis"; }, 10))
      << nodes[1]->CtlJson({"route", "restart redis", "--no-repo"}).dump();
  EXPECT_EQ(steps(1), steps(0));
  for (auto& d : nodes) EXPECT_EQ(d->Stop(SIGTERM), 0) << d->Log();
}

// A database outage longer than the node timeout: no node is declared lost for it (none
// could heartbeat, so none trusts what it sees of the others), `status` says the store
// does not answer instead of showing it empty, and once the database is back the nodes
// rejoin each other and work runs again, each task once. Its own PostgreSQL server: the
// test takes it down.
TEST(ClusterOutage, ADatabaseOutageLosesNoNodeAndWorkGoesOnAfterIt) {
  std::string why;
  std::unique_ptr<test::PgServer> pg = test::PgServer::StartOwn(&why);
  if (!pg) GTEST_SKIP() << "no PostgreSQL server of its own: " << why;
  const std::string url = pg->NewDatabase();
  ASSERT_FALSE(url.empty());
  TempDir da, db, shared;
  const std::string runs = shared / "runs";
  auto a = Node(da, "a", url, "experts:\n" + Recording("work", "a", runs, "job"));
  auto b = Node(db, "b", url, "experts:\n" + Recording("work", "b", runs, "job"));
  for (auto* d : {a.get(), b.get()}) ASSERT_TRUE(d->Start()) << d->Log();
  auto both_alive = [&] {
    for (auto* d : {a.get(), b.get()}) {
      json st = d->CtlJson({"status"});
      if (!st["nodes"].is_array() || st["nodes"].size() != 2) return false;
      for (const auto& n : st["nodes"])
        if (!n["alive"].get<bool>()) return false;
    }
    return true;
  };
  ASSERT_TRUE(test::Eventually(both_alive)) << a->CtlJson({"status"}).dump();
  ASSERT_EQ(a->Ctl({"submit", "--wait", "job before"}).code, 0) << a->Log();

  pg->Halt();
  // Both nodes keep serving; status says what it cannot know. Twice the node timeout (3 s).
  json st;
  ASSERT_TRUE(test::Eventually([&] {
    st = a->CtlJson({"status"});
    return st["store_read_error"].is_string();
  })) << st.dump();
  EXPECT_TRUE(st["tasks"].is_null()) << st.dump();
  EXPECT_TRUE(st["schema_version"].is_null()) << st.dump();
  test::Run human = a->Ctl({"status"});
  EXPECT_NE(human.out.find("tasks:     unknown: the store does not answer ("), std::string::npos)
      << human.out;
  EXPECT_NE(human.out.find("(schema unknown)"), std::string::npos) << human.out;
  // A submission is refused, not acknowledged and then lost.
  test::Run during = a->Ctl({"submit", "job during"}, 30);
  EXPECT_EQ(during.code, 1) << during.out << during.err;
  EXPECT_NE(during.err.find("storing the task (not acknowledged)"), std::string::npos)
      << during.err;
  sleep(6);
  for (auto* d : {a.get(), b.get()}) EXPECT_EQ(d->Ctl({"status"}).code, 0) << d->Log();
  // The last heartbeats each node saw before the outage.
  std::map<std::string, std::string> before;
  st = a->CtlJson({"status"});  // (a temporary's ["nodes"] would not outlive the loop)
  for (const auto& n : st["nodes"])
    before[n["node"].get<std::string>()] = n["heartbeat_at"].get<std::string>();
  ASSERT_EQ(before.size(), 2u) << st.dump();
  ASSERT_TRUE(pg->Resume(&why)) << why;

  // Back: both nodes beat again, each sees the other; and past another node timeout (the
  // moment a node that trusted its stale view would reap the other) neither is lost.
  ASSERT_TRUE(test::Eventually(
      [&] {
        for (auto* d : {a.get(), b.get()}) {
          json nodes = d->CtlJson({"status"})["nodes"];
          if (!nodes.is_array() || nodes.size() != 2) return false;
          for (const auto& n : nodes)
            if (!n["alive"].get<bool>() || !n["heartbeat_at"].is_string() ||
                n["heartbeat_at"].get<std::string>() <= before[n["node"].get<std::string>()])
              return false;
        }
        return true;
      },
      30))
      << a->CtlJson({"status"}).dump() << a->Log();
  sleep(4);
  ASSERT_TRUE(both_alive()) << a->CtlJson({"status"}).dump();
  st = b->CtlJson({"status"});
  EXPECT_TRUE(st["tasks"].is_object()) << st.dump();
  EXPECT_EQ(st["schema_version"], 5) << st.dump();
  for (auto* d : {a.get(), b.get()})
    for (const auto& e : d->CtlJson({"events", "--limit", "200"}))
      EXPECT_NE(e["event"], "node-lost") << e.dump() << d->Log();
  test::Run after = b->Ctl({"submit", "--wait", "job after", "--json"});
  ASSERT_EQ(after.code, 0) << after.out << after.err << b->Log();
  EXPECT_EQ(after.Json()["state"], "succeeded") << after.out;
  size_t twice = 0;
  for (const auto& [id, nodes] : Runs(runs)) twice += nodes.size() > 1;
  EXPECT_EQ(twice, 0u) << test::ReadFile(runs);
  EXPECT_EQ(Runs(runs).size(), 2u) << test::ReadFile(runs);
  std::set<std::string> texts;
  for (const auto& t : a->CtlJson({"history", "--json"})) texts.insert(t["text"]);
  EXPECT_EQ(texts, (std::set<std::string>{"job before", "job after"}));
  for (auto* d : {a.get(), b.get()}) EXPECT_EQ(d->Stop(SIGTERM), 0) << d->Log();
}

}  // namespace
}  // namespace cortex
