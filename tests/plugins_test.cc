// The registry and the bundled experts against the real .so files, once with each
// plugin instance in its own host process (the default) and once in-process; then what
// isolation adds: crashes, hangs and memory limits contained, restarts and quarantine.
#include <grp.h>
#include <gtest/gtest.h>
#include <pwd.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <thread>

#include "cortex/experts.h"
#include "testutil.h"

namespace cortex {
namespace {

using test::TempDir;
namespace fs = std::filesystem;

class RegistryTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    plugins_ = dir_ / "plugins";
    fs::create_directories(plugins_);
    fs::permissions(plugins_, fs::perms::owner_all, fs::perm_options::replace);
  }
  bool Isolated() const { return std::string(GetParam()) == "process"; }
  std::unique_ptr<ExpertRegistry> Make(bool bundled = false, Supervision sup = Supervision()) {
    ExpertRegistry::Options o;
    o.in_process = !Isolated();
    o.host_exe = test::HostExe();
    o.supervision = sup;
    o.env = env_;
    if (bundled) o.dirs.push_back(test::BundledDir());
    o.dirs.push_back(plugins_);
    o.cache_dir = dir_ / "cache";
    o.audit = [this](const ExpertEvent& e) { events_.push_back(e); };
    return std::make_unique<ExpertRegistry>(o);
  }
  void Drop(const std::string& name, const std::string& as, fs::perms perms = fs::perms(0755),
            const std::string& from = test::TestPluginDir()) {
    fs::copy_file(from + "/" + name, plugins_ + "/" + as, fs::copy_options::overwrite_existing);
    fs::permissions(plugins_ + "/" + as, perms, fs::perm_options::replace);
  }
  std::string LastRefusal() {
    for (auto it = events_.rbegin(); it != events_.rend(); ++it)
      if (it->event == "refused") return it->detail;
    return "";
  }
  // A registry (kept in reg_) with one configured instance of `plugin`, named `name`.
  std::shared_ptr<Expert> Instance(const std::string& name, const std::string& plugin,
                                   const std::string& settings_yaml, bool bundled,
                                   Supervision sup = Supervision()) {
    reg_ = Make(bundled, sup);
    reg_->Rescan();
    Status st = reg_->Configure(
        LoadConfigString(
            "experts:\n  - name: " + name + "\n    plugin: " + plugin + "\n" + settings_yaml, "x")
            .value());
    EXPECT_TRUE(st.ok()) << st.ToString();
    return reg_->Find(name);
  }
  Task MakeTask(const std::string& text, Tags tags = {}) {
    Task t;
    t.id = "t1";
    t.text = text;
    t.tags = std::move(tags);
    return t;
  }

  TempDir dir_;
  std::string plugins_;
  std::vector<ExpertEvent> events_;
  Env* env_ = Env::Default();  // the registry's clock and files
  std::unique_ptr<ExpertRegistry> reg_;
};

TEST_P(RegistryTest, LoadsBundledExpertsWithManifests) {
  auto reg = Make(true);
  reg->Rescan();
  ASSERT_TRUE(reg->Configure(Config{}).ok());
  auto inv = reg->Find("inventory");
  ASSERT_TRUE(inv);
  EXPECT_EQ(inv->manifest().version, "1.0.0");
  EXPECT_FALSE(inv->manifest().keywords.empty());
  EXPECT_FALSE(inv->manifest().examples.empty());
  EXPECT_TRUE(reg->Find("security"));
  EXPECT_FALSE(reg->Find("command")) << "command needs configuration: no default instance";
}

TEST_P(RegistryTest, RefusesWrongAbiForeignAndGarbageFiles) {
  Drop("echo_bad_abi.so", "badabi.so");
  Drop("noentry.so", "noentry.so");
  test::WriteFile(plugins_ + "/garbage.so", "this is not an ELF file");
  fs::permissions(plugins_ + "/garbage.so", fs::perms(0644), fs::perm_options::replace);
  auto reg = Make();
  reg->Rescan();
  EXPECT_TRUE(reg->Active().empty());
  std::map<std::string, std::string> why;
  for (const auto& e : events_)
    if (e.event == "refused") why[fs::path(e.file).filename()] = e.detail;
  ASSERT_EQ(why.size(), 3u);
  EXPECT_NE(why["badabi.so"].find("built for plugin ABI v999, this cortexd speaks v1"),
            std::string::npos)
      << why["badabi.so"];
  EXPECT_NE(why["noentry.so"].find("not a Cortex plugin: no cortex_plugin_entry"),
            std::string::npos)
      << why["noentry.so"];
  EXPECT_NE(why["garbage.so"].find("cannot load shared library"), std::string::npos)
      << why["garbage.so"];
  EXPECT_NE(why["garbage.so"].find(plugins_ + "/garbage.so"), std::string::npos)
      << "the message names the user's file, not the private copy";
  // Refusals are reported once, not on every rescan.
  size_t n = events_.size();
  reg->Rescan();
  EXPECT_EQ(events_.size(), n);
}

TEST_P(RegistryTest, RefusesGroupOrWorldWritableFilesAndFolders) {
  Drop("echo.so", "echo.so", fs::perms(0775));
  auto reg = Make();
  reg->Rescan();
  EXPECT_FALSE(reg->Find("echo"));
  EXPECT_NE(LastRefusal().find("unsafe permissions"), std::string::npos) << LastRefusal();
  EXPECT_NE(LastRefusal().find("its group"), std::string::npos);
  fs::permissions(plugins_ + "/echo.so", fs::perms(0755), fs::perm_options::replace);
  reg->Rescan();
  EXPECT_TRUE(reg->Find("echo"));
  fs::permissions(plugins_, fs::perms(0777), fs::perm_options::replace);
  reg->Rescan();
  EXPECT_FALSE(reg->Find("echo")) << "a world-writable folder disables everything in it";
  EXPECT_NE(LastRefusal().find("writable by others"), std::string::npos) << LastRefusal();
}

// Found by an attack: the path was checked, then opened again to be copied, so a symlink
// flipped in between loaded another user's library (its constructors ran as cortexd's
// user). Now the file is opened once, and what was opened is judged and copied.
TEST_P(RegistryTest, ASymlinkFlippedBetweenCheckAndCopyNeverLoadsAnotherUsersFile) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root to act as the user 'nobody'";
  struct passwd* nobody = getpwnam("nobody");
  if (!nobody) GTEST_SKIP() << "no user 'nobody' here";
  // The plugin folder links to a file in a folder 'nobody' controls; 'nobody' flips what
  // that file is, between our library and theirs, as fast as they can.
  fs::permissions(dir_.path(), fs::perms(0755), fs::perm_options::replace);
  const std::string evil = dir_ / "shared-tools";
  fs::create_directories(evil);
  ASSERT_EQ(chown(evil.c_str(), nobody->pw_uid, nobody->pw_gid), 0);
  const std::string mine = dir_ / "mine.so", theirs = evil + "/theirs.so";
  fs::copy_file(test::TestPluginDir() + "/echo.so", mine);
  fs::copy_file(test::TestPluginDir() + "/echo_v2.so", theirs);  // says version 2.0.0
  fs::permissions(mine, fs::perms(0755), fs::perm_options::replace);
  fs::permissions(theirs, fs::perms(0755), fs::perm_options::replace);
  ASSERT_EQ(chown(theirs.c_str(), nobody->pw_uid, nobody->pw_gid), 0);
  const std::string current = evil + "/current.so", tmp = evil + "/flip";
  ASSERT_EQ(symlink(mine.c_str(), current.c_str()), 0);
  const std::string link = plugins_ + "/echo.so";
  ASSERT_EQ(symlink(current.c_str(), link.c_str()), 0);
  const pid_t flipper = fork();  // before the registry starts any thread
  if (flipper == 0) {
    if (setgroups(0, nullptr) != 0 || setgid(nobody->pw_gid) != 0 || setuid(nobody->pw_uid) != 0)
      _exit(3);
    for (int i = 0; i < 20000000; ++i) {  // bounded; the test kills it sooner
      ::unlink(tmp.c_str());
      if (::symlink(i % 2 ? mine.c_str() : theirs.c_str(), tmp.c_str()) == 0)
        (void)::rename(tmp.c_str(), current.c_str());
    }
    _exit(0);
  }
  ASSERT_GT(flipper, 0);
  auto reg = Make();
  for (int i = 0; i < 300 && !HasFailure(); ++i) {
    reg->Rescan();
    if (auto e = reg->Find("echo")) {
      EXPECT_EQ(e->manifest().version, "1.0.0") << "another user's plugin was loaded";
    }
  }
  kill(flipper, SIGKILL);
  waitpid(flipper, nullptr, 0);
  // Settled on their file: refused, and the refusal names the link and what it led to.
  ::unlink(tmp.c_str());
  ASSERT_EQ(::symlink(theirs.c_str(), tmp.c_str()), 0);
  ASSERT_EQ(::rename(tmp.c_str(), current.c_str()), 0);
  reg->Rescan();
  EXPECT_FALSE(reg->Find("echo"));
  bool named = false;
  for (const auto& e : events_)
    named |= e.event == "refused" &&
             e.detail.find(link + " (a symlink to " + theirs + ")") != std::string::npos &&
             e.detail.find("owned by uid " + std::to_string(nobody->pw_uid)) != std::string::npos;
  EXPECT_TRUE(named) << "no refusal named both the link and its target";
  // Settled on ours: loaded through the same link.
  ASSERT_EQ(::symlink(mine.c_str(), tmp.c_str()), 0);
  ASSERT_EQ(::rename(tmp.c_str(), current.c_str()), 0);
  reg->Rescan();
  ASSERT_TRUE(reg->Find("echo"));
  EXPECT_EQ(reg->Find("echo")->manifest().version, "1.0.0");
}

TEST_P(RegistryTest, ReplaceAndRemoveTakeEffectOnRescan) {
  Drop("echo.so", "echo.so");
  auto reg = Make();
  reg->Rescan();
  auto v1 = reg->Find("echo");
  ASSERT_TRUE(v1);
  EXPECT_EQ(v1->manifest().version, "1.0.0");
  uint64_t gen = reg->generation();
  Drop("echo_v2.so", "echo.so");
  reg->Rescan();
  auto v2 = reg->Find("echo");
  ASSERT_TRUE(v2);
  EXPECT_EQ(v2->manifest().version, "2.0.0");
  EXPECT_GT(reg->generation(), gen);
  // The old instance still works for whoever holds it (an in-flight task).
  Outcome o = v1->Run(MakeTask("hi"), nullptr);
  EXPECT_EQ(o.kind, OutcomeKind::kSuccess);
  EXPECT_NE(o.output.find("1.0.0: hi"), std::string::npos);
  fs::remove(plugins_ + "/echo.so");
  reg->Rescan();
  EXPECT_FALSE(reg->Find("echo"));
  auto list = reg->List();
  ASSERT_EQ(list.size(), 1u);
  EXPECT_EQ(list[0].state, "removed");
}

TEST_P(RegistryTest, DuplicateNamesAreRefused) {
  Drop("echo.so", "a.so");
  Drop("echo_v2.so", "b.so");
  auto reg = Make();
  reg->Rescan();
  EXPECT_EQ(reg->Active().size(), 1u);
  EXPECT_NE(LastRefusal().find("already loaded"), std::string::npos);
}

TEST_P(RegistryTest, ConfiguredInstancesAreValidatedWithFileLineAndKey) {
  Drop("echo.so", "echo.so");
  auto reg = Make(true);
  reg->Rescan();
  auto cfg = [](const std::string& yaml) { return LoadConfigString(yaml, "x.yaml").value(); };
  Status st = reg->Configure(cfg("experts:\n  - name: e2\n    plugin: nosuch\n"));
  EXPECT_NE(st.message().find("x.yaml:2: experts[0].plugin: no plugin named 'nosuch'"),
            std::string::npos)
      << st.message();
  st = reg->Configure(cfg("experts:\n  - name: e2\n    plugin: echo\n    colour: red\n"));
  EXPECT_NE(st.message().find("x.yaml:4: experts[0].colour: unknown key for plugin 'echo'"),
            std::string::npos)
      << st.message();
  st = reg->Configure(cfg("experts:\n  - name: e2\n    plugin: echo\n    prefix: [1]\n"));
  EXPECT_NE(st.message().find("x.yaml:4: experts[0].prefix: expected a string"), std::string::npos)
      << st.message();
  st = reg->Configure(cfg("experts:\n  - name: c\n    plugin: command\n"));
  EXPECT_NE(st.message().find("experts[0]: run: is required"), std::string::npos) << st.message();
  EXPECT_FALSE(reg->Find("e2")) << "a refused config changes nothing";
  ASSERT_TRUE(
      reg->Configure(
             cfg("experts:\n  - name: e2\n    plugin: echo\n    prefix: 'P '\n    capacity: 3\n"))
          .ok());
  auto e2 = reg->Find("e2");
  ASSERT_TRUE(e2);
  EXPECT_EQ(e2->manifest().capacity, 3);
  EXPECT_NE(e2->Run(MakeTask("x"), nullptr).output.find("P 1.0.0: x"), std::string::npos);
  EXPECT_TRUE(reg->Find("echo")) << "the default instance stays";
}

TEST_P(RegistryTest, TimeoutAbandonsAHungPluginAndKeepsItsSlot) {
  Drop("echo.so", "echo.so");
  auto reg = Make();
  reg->Rescan();
  ASSERT_TRUE(reg->Configure(LoadConfigString("experts:\n  - name: slow\n    plugin: echo\n    "
                                              "capacity: 1\n    timeout: 300ms\n",
                                              "x")
                                 .value())
                  .ok());
  auto e = reg->Find("slow");
  ASSERT_TRUE(e);
  Outcome o = e->Run(MakeTask("please hang"), nullptr);
  EXPECT_EQ(o.kind, OutcomeKind::kTimeout);
  EXPECT_GE(o.duration_s, 0.29);
  EXPECT_LT(o.duration_s, 20.0);  // cut off, not left hanging (bound allows a slow machine)
  // The plugin honours cancellation, so its slot comes back.
  EXPECT_TRUE(test::Eventually([&] { return e->inflight() == 0; }));
  EXPECT_EQ(e->Run(MakeTask("please fail"), nullptr).kind, OutcomeKind::kFailure);
  EXPECT_EQ(e->Run(MakeTask("please reject"), nullptr).kind, OutcomeKind::kRejected);
  Outcome ok = e->Run(MakeTask("hello"), nullptr);
  EXPECT_EQ(ok.kind, OutcomeKind::kSuccess);
  EXPECT_DOUBLE_EQ(ok.quality, 0.75);
}

// ---- the command expert -----------------------------------------------------------

class CommandTest : public RegistryTest {
 protected:
  std::shared_ptr<Expert> Command(const std::string& settings_yaml) {
    return Instance("c", "command", settings_yaml, true);
  }
};

TEST_P(CommandTest, PassesTextOnStdinAndEnvironmentNeverThroughAShell) {
  auto e = Command(
      "    run: [\"/bin/sh\", \"-c\", \"cat; echo; echo "
      "\\\"$CORTEX_TASK_TEXT|$CORTEX_TAG_REPO|$SECRET_FROM_DAEMON\\\"\"]\n");
  ASSERT_TRUE(e);
  setenv("SECRET_FROM_DAEMON", "leak", 1);
  Outcome o = e->Run(MakeTask("hello $(touch /tmp/pwned) world", {{"repo", "/r"}}), nullptr);
  unsetenv("SECRET_FROM_DAEMON");
  EXPECT_EQ(o.kind, OutcomeKind::kSuccess) << o.error;
  EXPECT_NE(o.output.find("hello $(touch /tmp/pwned) world\nhello $(touch /tmp/pwned) world|/r|\n"),
            std::string::npos)
      << o.output;
  // Without `cwd`, it runs in the task's repository when that is a folder.
  TempDir repo;
  Outcome in_repo =
      Command("    run: [\"pwd\"]\n")->Run(MakeTask("x", {{"repo", repo.path()}}), nullptr);
  EXPECT_EQ(in_repo.output, repo.path() + "\n");
  // An `env` entry replaces the variable it names (a program reads the first one).
  Outcome lang = Command("    run: [\"/bin/sh\", \"-c\", \"echo $LANG\"]\n    env: {LANG: C}\n")
                     ->Run(MakeTask("x"), nullptr);
  EXPECT_EQ(lang.output, "C\n");
  // ... but not one of the task's own CORTEX_* variables.
  Status forged = reg_->Configure(
      LoadConfigString("experts:\n  - name: f\n    plugin: command\n    run: [\"true\"]\n"
                       "    env: {CORTEX_TASK_TEXT: forged}\n",
                       "x")
          .value());
  EXPECT_NE(forged.message().find("CORTEX_* variables carry the task"), std::string::npos)
      << forged.ToString();
  // argv is passed as given: a program name with shell syntax is just a missing program.
  auto e2 = Command("    run: [\"true; touch /tmp/cortex-pwned\"]\n");
  Outcome o2 = e2->Run(MakeTask("x"), nullptr);
  EXPECT_EQ(o2.kind, OutcomeKind::kFailure);
  EXPECT_FALSE(fs::exists("/tmp/cortex-pwned"));
}

TEST_P(CommandTest, ExitCodeQualityLineTimeoutAndCrash) {
  EXPECT_EQ(Command("    run: [\"true\"]\n")->Run(MakeTask("x"), nullptr).kind,
            OutcomeKind::kSuccess);
  Outcome f = Command("    run: [\"/bin/sh\", \"-c\", \"exit 3\"]\n")->Run(MakeTask("x"), nullptr);
  EXPECT_EQ(f.kind, OutcomeKind::kFailure);
  EXPECT_EQ(f.error, "exit status 3");
  Outcome q =
      Command("    run: [\"/bin/sh\", \"-c\", \"echo working; echo '{\\\"quality\\\": 0.4}'\"]\n")
          ->Run(MakeTask("x"), nullptr);
  EXPECT_EQ(q.kind, OutcomeKind::kSuccess);
  EXPECT_DOUBLE_EQ(q.quality, 0.4);
  Outcome t =
      Command("    run: [\"sleep\", \"30\"]\n    timeout: 300ms\n")->Run(MakeTask("x"), nullptr);
  EXPECT_EQ(t.kind, OutcomeKind::kTimeout);
  EXPECT_LT(t.duration_s, 20.0);  // well before the program's own 30 s
  Outcome c =
      Command("    run: [\"/bin/sh\", \"-c\", \"kill -SEGV $$\"]\n")->Run(MakeTask("x"), nullptr);
  EXPECT_EQ(c.kind, OutcomeKind::kCrash);
  EXPECT_EQ(c.error, "killed by SIGSEGV");
  Outcome big = Command("    run: [\"head\", \"-c\", \"1000000\", \"/dev/zero\"]\n")
                    ->Run(MakeTask("x"), nullptr);
  EXPECT_EQ(big.kind, OutcomeKind::kSuccess);
  EXPECT_LE(big.output.size(), kMaxExpertOutputBytes + 64) << "output is bounded";
}

// ---- the repository experts on a real git repository -------------------------------

class RepoExpertTest : public RegistryTest {
 protected:
  void SetUp() override {
    RegistryTest::SetUp();
    repo_ = dir_ / "repo";
    fs::create_directories(repo_ + "/src");
    test::WriteFile(repo_ + "/CMakeLists.txt", "project(x)\n");
    test::WriteFile(repo_ + "/package.json", "{}\n");
    test::WriteFile(repo_ + "/src/main.cc", "int main() {\n  return 0;\n}\n");
    test::WriteFile(repo_ + "/src/util.py", "print(1)\n");
    // Secrets assembled at run time so this source file holds none.
    test::WriteFile(repo_ + "/deploy/key.txt",
                    std::string("-----BEGIN RSA ") + "PRIVATE KEY-----\nMIIB\n");
    test::WriteFile(repo_ + "/src/config.js",
                    std::string("const k = '") + "AKIA" + "ABCDEFGHIJKLMNOP';\n");
    test::WriteFile(repo_ + "/open.sh", "echo hi\n");
    chmod((repo_ + "/open.sh").c_str(), 0666);
    test::WriteFile(repo_ + "/build/ignored.cc",
                    std::string("// ") + "AKIA" + "ZZZZZZZZZZZZZZZZ\n");
    test::WriteFile(repo_ + "/.gitignore", "build/\n");
    ASSERT_EQ(test::RunCmd({"git", "-C", repo_, "init", "-q"}).code, 0);
    ASSERT_EQ(test::RunCmd({"git", "-C", repo_, "-c", "safe.directory=*", "add", "-A"}).code, 0);
    reg_ = Make(true);
    reg_->Rescan();
    ASSERT_TRUE(reg_->Configure(Config{}).ok());
  }
  std::string repo_;
};

TEST_P(RepoExpertTest, InventoryCatalogsLanguagesAndManifests) {
  Outcome o =
      reg_->Find("inventory")->Run(MakeTask("what is in this repo", {{"repo", repo_}}), nullptr);
  ASSERT_EQ(o.kind, OutcomeKind::kSuccess) << o.error;
  std::string last = o.output.substr(o.output.rfind('\n', o.output.size() - 2) + 1);
  auto j = nlohmann::json::parse(last);
  EXPECT_EQ(j["listing"], "git ls-files");
  EXPECT_EQ(j["files"], 8) << o.output;  // build/ is ignored by git
  EXPECT_EQ(j["languages"]["C++"]["lines"], 3);
  EXPECT_EQ(j["languages"]["Python"]["files"], 1);
  std::set<std::string> manifests;
  for (const auto& m : j["manifests"]) manifests.insert(m["path"].get<std::string>());
  EXPECT_TRUE(manifests.count("CMakeLists.txt"));
  EXPECT_TRUE(manifests.count("package.json"));
}

TEST_P(RepoExpertTest, SecurityFindsKeysTokensAndUnsafeModes) {
  Outcome o = reg_->Find("security")->Run(MakeTask("scan for secrets", {{"repo", repo_}}), nullptr);
  ASSERT_EQ(o.kind, OutcomeKind::kSuccess) << o.error;
  EXPECT_NE(o.output.find("private key at deploy/key.txt:1"), std::string::npos) << o.output;
  EXPECT_NE(o.output.find("AWS access key id at src/config.js:1"), std::string::npos) << o.output;
  EXPECT_NE(o.output.find("world-writable file at open.sh"), std::string::npos) << o.output;
  EXPECT_EQ(o.output.find("ignored.cc"), std::string::npos)
      << "untracked build output is not scanned";
  EXPECT_EQ(o.output.find("ABCDEFGHIJKLMNOP"), std::string::npos) << "matches are redacted";
}

TEST_P(RepoExpertTest, WithoutARepoTheyRejectAndOnAMissingPathTheyFail) {
  Outcome o = reg_->Find("security")->Run(MakeTask("scan"), nullptr);
  EXPECT_EQ(o.kind, OutcomeKind::kRejected);
  EXPECT_NE(o.error.find("repo=PATH"), std::string::npos);
  o = reg_->Find("inventory")->Run(MakeTask("x", {{"repo", dir_ / "missing"}}), nullptr);
  EXPECT_EQ(o.kind, OutcomeKind::kFailure);
  EXPECT_NE(o.error.find("not a directory"), std::string::npos);
}

TEST_P(RepoExpertTest, WalksAFolderThatIsNotAGitCheckout) {
  fs::remove_all(repo_ + "/.git");
  Outcome o = reg_->Find("inventory")->Run(MakeTask("x", {{"repo", repo_}}), nullptr);
  ASSERT_EQ(o.kind, OutcomeKind::kSuccess);
  EXPECT_NE(o.output.find("directory walk"), std::string::npos);
  EXPECT_NE(o.output.find("\"files\":9"), std::string::npos) << o.output;
}

// ---- isolation: what a host process contains ---------------------------------------

class IsolationTest : public RegistryTest {
 protected:
  std::shared_ptr<Expert> Misbehave(const std::string& settings_yaml, Supervision sup) {
    Drop("misbehave.so", "misbehave.so", fs::perms(0755), test::BenchPluginDir());
    return Instance("m", "misbehave", settings_yaml, false, sup);
  }
  bool HasEvent(const std::string& event) {
    for (const auto& e : events_)
      if (e.event == event && e.expert == "m") return true;
    return false;
  }
};

TEST_P(IsolationTest, SegfaultsAndAbortsAreCrashesAndTheHostComesBack) {
  Supervision sup;
  sup.backoff_s = 0.05;
  const std::string started = dir_ / "slow-started";
  auto e =
      Misbehave("    capacity: 2\n    delay_ms: 1500\n    started_file: " + started + "\n", sup);
  ASSERT_TRUE(e);
  const int pid1 = e->host_pid();
  ASSERT_GT(pid1, 0);
  EXPECT_NE(pid1, getpid()) << "the plugin runs in a process of its own";
  // A slow task shares the host with the one that segfaults: both end as crashes, and
  // the host's death counts as one crash event, not two.
  Outcome slow;
  std::thread t([&] { slow = e->Run(MakeTask("please be slow"), nullptr); });
  // The segfault must hit while the slow task runs in the same host: wait until it does.
  ASSERT_TRUE(test::Eventually([&] { return fs::exists(started); }));
  Outcome o = e->Run(MakeTask("please segfault"), nullptr);
  t.join();
  EXPECT_EQ(o.kind, OutcomeKind::kCrash);
  EXPECT_NE(o.error.find("killed by SIGSEGV"), std::string::npos) << o.error;
  EXPECT_EQ(slow.kind, OutcomeKind::kCrash) << slow.error;
  EXPECT_EQ(e->health().crashes, 1);
  EXPECT_EQ(e->inflight(), 0) << "a dead host frees every slot it held";
  EXPECT_EQ(e->host_pid(), 0);
  // The next task starts a fresh host once the backoff has passed.
  Outcome ok = e->Run(MakeTask("hello"), nullptr);
  EXPECT_EQ(ok.kind, OutcomeKind::kSuccess) << ok.error;
  EXPECT_NE(ok.output.find("done: hello"), std::string::npos);
  EXPECT_GT(e->host_pid(), 0);
  EXPECT_NE(e->host_pid(), pid1);
  EXPECT_EQ(e->health().restarts, 1);
  EXPECT_EQ(e->health().consecutive_crashes, 0) << "a success ends a run of crashes";
  Outcome ab = e->Run(MakeTask("please abort"), nullptr);
  EXPECT_EQ(ab.kind, OutcomeKind::kCrash);
  EXPECT_NE(ab.error.find("SIGABRT"), std::string::npos) << ab.error;
}

// The host a hung task takes down counts as one crash: a plugin that hangs every task is
// quarantined like one that crashes (a timeout does not break the run).
TEST_P(IsolationTest, AHungPluginTimesOutAndItsHostIsReplacedCountedAsOneCrash) {
  Supervision sup;
  sup.hang_grace_s = 0.2;
  sup.backoff_s = 0.01;
  auto e = Misbehave("    capacity: 1\n    timeout: 300ms\n", sup);
  ASSERT_TRUE(e);
  const int pid1 = e->host_pid();
  Outcome o = e->Run(MakeTask("please hang hard"), nullptr);
  EXPECT_EQ(o.kind, OutcomeKind::kTimeout);
  EXPECT_LT(o.duration_s, 20.0);
  // It ignores cancellation; its host is killed after the grace period, freeing the slot.
  EXPECT_TRUE(test::Eventually([&] { return e->inflight() == 0; }));
  Outcome ok = e->Run(MakeTask("hello"), nullptr);
  EXPECT_EQ(ok.kind, OutcomeKind::kSuccess) << ok.error;
  EXPECT_NE(e->host_pid(), pid1);
  EXPECT_EQ(e->health().crashes, 1);
  EXPECT_NE(e->health().last_crash.find("hung past its timeout"), std::string::npos)
      << e->health().last_crash;
}

TEST_P(IsolationTest, AMemoryHogHitsItsLimitInItsHostNotInCortexd) {
  Supervision sup;
  sup.memory_limit = 64 << 20;
  sup.backoff_s = 0.01;
  auto e = Misbehave("    memory_mb: 1024\n", sup);
  ASSERT_TRUE(e);
  if (e->memory_limit() == 0)
    GTEST_SKIP() << "sanitizer build: the host cannot enforce a memory limit under a "
                    "sanitizer runtime (it reserves terabytes of shadow memory)";
  Outcome o = e->Run(MakeTask("please eat memory"), nullptr);
  EXPECT_EQ(o.kind, OutcomeKind::kCrash);
  EXPECT_NE(o.error.find("over its memory limit (64 MiB)"), std::string::npos) << o.error;
  EXPECT_EQ(e->Run(MakeTask("hello"), nullptr).kind, OutcomeKind::kSuccess);
}

TEST_P(IsolationTest, RepeatedCrashesQuarantineUntilReleasedOrReplaced) {
  Supervision sup;
  sup.quarantine_after = 3;
  sup.backoff_s = 0.01;
  auto e = Misbehave("", sup);
  ASSERT_TRUE(e);
  for (int i = 0; i < 3; ++i)
    EXPECT_EQ(e->Run(MakeTask("please segfault"), nullptr).kind, OutcomeKind::kCrash);
  EXPECT_TRUE(e->quarantined());
  EXPECT_TRUE(HasEvent("quarantined"));
  for (const auto& a : reg_->Active()) EXPECT_NE(a->name(), "m") << "not routed to";
  EXPECT_FALSE(reg_->Find("misbehave")->quarantined()) << "its sibling instance is unaffected";
  bool listed = false;
  for (const auto& i : reg_->List()) {
    if (i.name != "m") continue;
    listed = true;
    EXPECT_EQ(i.state, "quarantined");
    EXPECT_EQ(i.health.consecutive_crashes, 3);
  }
  EXPECT_TRUE(listed);
  Outcome refused = e->Run(MakeTask("hello"), nullptr);
  EXPECT_EQ(refused.kind, OutcomeKind::kRejected);
  EXPECT_NE(refused.error.find("quarantined"), std::string::npos);
  // Released by command...
  ASSERT_TRUE(reg_->Release("m").ok());
  EXPECT_TRUE(HasEvent("released"));
  EXPECT_EQ(e->Run(MakeTask("hello"), nullptr).kind, OutcomeKind::kSuccess);
  EXPECT_EQ(reg_->Release("m").code(), Status::Code::kFailedPrecondition);
  EXPECT_EQ(reg_->Release("nosuch").code(), Status::Code::kNotFound);
  // ...or by a new file.
  for (int i = 0; i < 3; ++i) e->Run(MakeTask("please segfault"), nullptr);
  ASSERT_TRUE(e->quarantined());
  Drop("misbehave.so", "misbehave.so", fs::perms(0755), test::BenchPluginDir());
  // The same bytes again: a distinct mtime is what makes it a new file (set, not slept for).
  const std::string dropped = plugins_ + "/misbehave.so";
  fs::last_write_time(dropped, fs::last_write_time(dropped) + std::chrono::seconds(5));
  reg_->Rescan();
  auto fresh = reg_->Find("m");
  ASSERT_TRUE(fresh);
  EXPECT_FALSE(fresh->quarantined());
  EXPECT_EQ(fresh->Run(MakeTask("hello"), nullptr).kind, OutcomeKind::kSuccess);
}

TEST_P(IsolationTest, APluginThatCrashesWhileLoadingIsRefused) {
  Drop("misbehave_on_load.so", "bad.so", fs::perms(0755), test::BenchPluginDir());
  Drop("echo.so", "echo.so");
  auto reg = Make();
  reg->Rescan();
  EXPECT_NE(LastRefusal().find("killed by SIGSEGV"), std::string::npos) << LastRefusal();
  auto echo = reg->Find("echo");
  ASSERT_TRUE(echo);
  EXPECT_EQ(echo->Run(MakeTask("hi"), nullptr).kind, OutcomeKind::kSuccess);
}

// The real clock, until a test moves it on (leveldb's SpecialEnv, for time).
class JumpClock : public EnvWrapper {
 public:
  JumpClock() : EnvWrapper(Env::Default()) {}
  int64_t MonotonicMicros() override { return EnvWrapper::MonotonicMicros() + skew_.load(); }
  void Advance(double seconds) { skew_ += static_cast<int64_t>(seconds * 1e6); }

 private:
  std::atomic<int64_t> skew_{0};
};

// The registry's Env is its experts' clock: an hour's backoff after a crash holds the
// expert until the clock says the hour has passed, and not a moment longer (nothing here
// sleeps for it).
TEST_P(IsolationTest, BackoffAfterACrashRunsOnTheRegistrysClock) {
  JumpClock clock;
  env_ = &clock;
  Supervision sup;
  sup.backoff_s = sup.backoff_max_s = 3600;
  auto e = Misbehave("", sup);
  ASSERT_TRUE(e);
  EXPECT_EQ(e->Run(MakeTask("please segfault"), nullptr).kind, OutcomeKind::kCrash);
  EXPECT_EQ(e->health().state, "restarting");
  Outcome early = e->Run(MakeTask("hello"), nullptr);
  EXPECT_EQ(early.kind, OutcomeKind::kRejected);
  EXPECT_NE(early.error.find("restarting after a crash (next start in 3"), std::string::npos)
      << early.error;
  clock.Advance(3000);
  Outcome still = e->Run(MakeTask("hello"), nullptr);
  EXPECT_EQ(still.kind, OutcomeKind::kRejected);
  const size_t at = still.error.find("next start in ");
  ASSERT_NE(at, std::string::npos) << still.error;
  const double left = std::atof(still.error.c_str() + at + 14);
  EXPECT_GT(left, 500);  // the hour less the 3000 s the clock moved on
  EXPECT_LE(left, 600);
  clock.Advance(601);
  EXPECT_EQ(e->health().state, "active");
  Outcome later = e->Run(MakeTask("hello"), nullptr);
  EXPECT_EQ(later.kind, OutcomeKind::kSuccess) << later.error;
  EXPECT_EQ(e->health().restarts, 1);
  reg_.reset();  // before the clock it uses goes
}

INSTANTIATE_TEST_SUITE_P(Process, IsolationTest, ::testing::Values("process"),
                         [](const auto&) { return std::string("Isolated"); });

const auto kModes = ::testing::Values("process", "in-process");
auto ModeName = [](const ::testing::TestParamInfo<const char*>& i) {
  return std::string(i.param) == "process" ? std::string("Isolated") : std::string("InProcess");
};
INSTANTIATE_TEST_SUITE_P(Both, RegistryTest, kModes, ModeName);
INSTANTIATE_TEST_SUITE_P(Both, CommandTest, kModes, ModeName);
INSTANTIATE_TEST_SUITE_P(Both, RepoExpertTest, kModes, ModeName);

}  // namespace
}  // namespace cortex
