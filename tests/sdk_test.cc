// The plugin SDK as a third party gets it: install this build into a fresh prefix, build
// the installed example plugin out of tree with find_package(Cortex) (and once more with
// only pkg-config's flags), drop it into a cortexd started from that prefix, and see it
// loaded and routed to.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <sstream>

#include "cortex/plugin.h"
#include "testutil.h"

namespace cortex {
namespace {

using test::Daemon;
using test::TempDir;
using json = nlohmann::json;
namespace fs = std::filesystem;

// A toolchain step: its output is shown when it fails, since that is the whole story.
testing::AssertionResult Ran(const test::Run& r, const std::string& what) {
  if (r.code == 0) return testing::AssertionSuccess();
  return testing::AssertionFailure() << what << " exited " << r.code << "\n"
                                     << r.out << "\n"
                                     << r.err;
}

std::vector<std::string> Words(const std::string& s) {
  std::istringstream in(s);
  std::vector<std::string> out;
  for (std::string w; in >> w;) out.push_back(w);
  return out;
}

TEST(Sdk, InstalledExampleBuildsOutOfTreeAndIsRouted) {
  umask(022);  // what cmake --install creates must pass cortexd's plugin folder checks
  TempDir dir;
  // Outside any git work tree, so no cortexctl adds a repo= tag that the bundled experts
  // would take up.
  fs::current_path(dir.path());
  const std::string prefix = dir / "prefix";
  const std::string cmake = CORTEX_TEST_CMAKE;

  // 1. Install this build tree, as a packager would.
  ASSERT_TRUE(
      Ran(test::RunCmd({cmake, "--install", CORTEX_TEST_BUILD_DIR, "--prefix", prefix}, 300),
          "cmake --install"));
  const std::string example = prefix + "/share/cortex/examples/plugin";
  for (const std::string f :
       {"/bin/cortexd", "/bin/cortexctl", "/lib/cortex/cortex-plugin-host",
        "/include/cortex/plugin.h", "/include/cortex/plugin_sdk.hpp",
        "/lib/cmake/Cortex/CortexConfig.cmake", "/lib/cmake/Cortex/CortexConfigVersion.cmake",
        "/lib/pkgconfig/cortex-plugin.pc", "/share/cortex/examples/plugin/CMakeLists.txt",
        "/share/doc/cortex/PLUGINS.md"})
    ASSERT_TRUE(fs::exists(prefix + f)) << f << " is not installed";

  // 2. Build the example from the installed tree, out of it, knowing only the prefix.
  const std::string build = dir / "example-build";
  ASSERT_TRUE(
      Ran(test::RunCmd({cmake, "-S", example, "-B", build, "-G", CORTEX_TEST_GENERATOR,
                        "-DCMAKE_MAKE_PROGRAM=" CORTEX_TEST_MAKE_PROGRAM,
                        "-DCMAKE_CXX_COMPILER=" CORTEX_TEST_CXX, "-DCMAKE_PREFIX_PATH=" + prefix,
                        "-DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF"},
                       300),
          "configuring the example"));
  // It must have found this prefix's package, not another Cortex on the machine.
  const std::string cache = test::ReadFile(build + "/CMakeCache.txt");
  EXPECT_NE(cache.find("Cortex_DIR:PATH=" + prefix + "/lib/cmake/Cortex"), std::string::npos)
      << cache.substr(0, 2000);
  ASSERT_TRUE(Ran(test::RunCmd({cmake, "--build", build}, 300), "building the example"));
  const std::string so = build + "/calc.so";
  ASSERT_TRUE(fs::exists(so));

  // 3. pkg-config alone gives enough to compile it too (nlohmann_json comes through
  // Requires); -O0 because only the flags are under test here.
  std::vector<std::string> env = test::BaseEnv();
  env.push_back("PKG_CONFIG_PATH=" + prefix + "/lib/pkgconfig");
  test::Run pc = test::RunCmd({"pkg-config", "--cflags", "cortex-plugin"}, 60, "", env);
  ASSERT_TRUE(Ran(pc, "pkg-config --cflags cortex-plugin"));
  EXPECT_NE(pc.out.find("-I" + prefix), std::string::npos) << pc.out;
  test::Run abi =
      test::RunCmd({"pkg-config", "--variable=abi_version", "cortex-plugin"}, 60, "", env);
  EXPECT_EQ(abi.out, std::to_string(CORTEX_PLUGIN_ABI_VERSION) + "\n");
  std::vector<std::string> cc = {CORTEX_TEST_CXX, "-std=c++17", "-O0",
                                 "-shared",       "-fPIC",      "-fvisibility=hidden"};
  for (const auto& w : Words(pc.out)) cc.push_back(w);
  for (const char* w : {"-Wl,--no-undefined", "-o"}) cc.push_back(w);
  cc.push_back(dir / "calc-pc.so");
  cc.push_back(example + "/calc.cc");
  ASSERT_TRUE(Ran(test::RunCmd(cc, 300), "compiling with pkg-config's flags"));

  // 4. A cortexd from the prefix: its plugin host and bundled experts come from there.
  Daemon d(dir);
  d.bin_dir = prefix + "/bin";
  ASSERT_TRUE(d.Start()) << d.Log();
  auto expert = [&](const std::string& name) -> json {
    for (const auto& e : d.CtlJson({"experts"}))
      if (e["name"] == name) return e;
    return json();
  };
  ASSERT_TRUE(expert("inventory").is_object()) << d.CtlJson({"experts"}).dump(2);
  EXPECT_EQ(
      expert("inventory")["file"].get<std::string>().rfind(prefix + "/lib/cortex/plugins/", 0), 0u)
      << expert("inventory");
  EXPECT_FALSE(expert("calc").is_object());

  // 5. Drop the plugin in (written beside, then renamed, as an installer would).
  const std::string tmp = d.plugin_dir + "/.calc.so.tmp";
  fs::copy_file(so, tmp);
  fs::permissions(tmp, fs::perms(0755), fs::perm_options::replace);
  fs::rename(tmp, d.plugin_dir + "/calc.so");
  ASSERT_TRUE(test::Eventually([&] { return expert("calc")["state"] == "active"; }))
      << d.CtlJson({"experts"}).dump(2) << d.CtlJson({"events"}).dump(2) << d.Log();
  EXPECT_EQ(expert("calc")["version"], "1.0.0");

  // 6. Routed by its manifest alone (no rules, no history), and it does the work.
  const std::string task = "calculate 12 * (3 + 4)";
  json route = d.CtlJson({"route", task});
  ASSERT_TRUE(route.is_object() && !route["candidates"].empty()) << route;
  EXPECT_EQ(route["candidates"][0]["expert"], "calc") << route.dump(2);
  json w = d.CtlJson({"submit", task, "--wait"});
  ASSERT_TRUE(w.is_object()) << w;
  EXPECT_EQ(w["state"], "succeeded") << w.dump(2);
  EXPECT_EQ(w["expert"], "calc") << w.dump(2);
  EXPECT_EQ(w["outcome"]["kind"], "success");
  json s = d.CtlJson({"show", w["id"]});
  ASSERT_EQ(s["attempts"].size(), 1u) << s.dump(2);
  EXPECT_EQ(s["attempts"][0]["expert"], "calc");
  EXPECT_NE(s["attempts"][0]["outcome"]["output"].get<std::string>().find("12 * (3 + 4) = 84"),
            std::string::npos)
      << s.dump(2);

  // 7. A configured instance gets its own settings (YAML scalars reach Create as strings).
  test::WriteFile(d.config, test::ReadFile(d.config) + R"(experts:
  - name: calc-short
    plugin: calc
    precision: 4
rules:
  - name: short
    match: ["roughly"]
    expert: calc-short
    force: true
)");
  test::Run r = d.Ctl({"reload"});
  ASSERT_EQ(r.code, 0) << r.out << r.err;
  w = d.CtlJson({"submit", "roughly 1/3", "--wait"});
  EXPECT_EQ(w["expert"], "calc-short") << w.dump(2);
  EXPECT_EQ(d.CtlJson({"show", w["id"]})["attempts"][0]["outcome"]["output"], "1/3 = 0.3333\n");

  EXPECT_EQ(d.Stop(), 0) << d.Log();
}

}  // namespace
}  // namespace cortex
