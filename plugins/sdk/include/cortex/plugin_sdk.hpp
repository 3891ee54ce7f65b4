// C++ convenience for writing Cortex plugins: implement a class, then expose it with
// CORTEX_EXPORT_PLUGIN(Class, manifest). The macro writes the extern "C" entry point and
// catches every exception so none crosses the plugin boundary.
//
//   class MyExpert {
//    public:
//     static MyExpert* Create(const nlohmann::json& settings, std::string* err);
//     cortex_result Execute(const cortex_task& task, const cortex_host& host);
//   };
//
// What this header needs (the only dependencies of a plugin built with it):
//   - C++17 or newer;
//   - nlohmann-json 3.10 or newer, header-only (Debian: nlohmann-json3-dev); settings
//     reach Create() as an nlohmann::json object;
//   - cortex/plugin.h beside it (the C ABI).
// No Boost and no Cortex library to link: cortexd loads plugins with Boost.DLL, but a
// plugin only has to export one C symbol. `find_package(Cortex)` (target
// Cortex::plugin_sdk) or `pkg-config --cflags cortex-plugin` brings all of it; see
// docs/PLUGINS.md, which also says how to build the plugin (hidden visibility, MODULE).
#pragma once

#if __cplusplus < 201703L
#error "cortex/plugin_sdk.hpp needs C++17 or newer (-std=c++17)"
#endif
#if defined(__has_include)
#if !__has_include(<nlohmann/json.hpp>)
#error \
    "cortex/plugin_sdk.hpp needs nlohmann-json >= 3.10 (Debian: apt install nlohmann-json3-dev; CMake: find_package(Cortex) and link Cortex::plugin_sdk; pkg-config: cortex-plugin)"
#endif
#endif

#include <cstdio>
#include <cstring>
#include <exception>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "cortex/plugin.h"

// Sources written when this header brought in Boost may mark an entry point
// BOOST_SYMBOL_EXPORT themselves. Spelled exactly as Boost spells it on ELF, so Boost's
// own definition may come before or after this one.
#if !defined(BOOST_SYMBOL_EXPORT) && !defined(_WIN32)
#define BOOST_SYMBOL_EXPORT __attribute__((__visibility__("default")))
#endif

namespace cortex::sdk {

inline cortex_result Result(cortex_outcome_kind kind, double quality = -1,
                            const char* error = nullptr) {
  return cortex_result{kind, quality, error};
}

inline void Write(const cortex_host& host, std::string_view s) {
  host.write_output(host.ctx, s.data(), s.size());
}

inline std::string_view Tag(const cortex_task& task, std::string_view key) {
  for (size_t i = 0; i < task.n_tags; ++i)
    if (key == task.tags[i].key) return task.tags[i].value;
  return {};
}

inline void CopyError(const std::string& msg, char* err, size_t len) {
  if (err && len) std::snprintf(err, len, "%s", msg.c_str());
}

template <class T>
void* CreateThunk(const char* settings_json, char* err, size_t err_len) noexcept {
  try {
    nlohmann::json settings = nlohmann::json::parse(settings_json ? settings_json : "{}");
    std::string msg;
    T* t = T::Create(settings, &msg);
    if (!t) CopyError(msg.empty() ? "cannot create instance" : msg, err, err_len);
    return t;
  } catch (const std::exception& e) {
    CopyError(std::string("settings: ") + e.what(), err, err_len);
  } catch (...) {
    CopyError("settings: unknown error", err, err_len);
  }
  return nullptr;
}

template <class T>
void DestroyThunk(void* instance) noexcept {
  delete static_cast<T*>(instance);
}

template <class T>
cortex_result ExecuteThunk(void* instance, const cortex_task* task,
                           const cortex_host* host) noexcept {
  try {
    return static_cast<T*>(instance)->Execute(*task, *host);
  } catch (const std::exception& e) {
    std::string msg = std::string("exception: ") + e.what();
    host->write_output(host->ctx, msg.data(), msg.size());
  } catch (...) {
  }
  return Result(CORTEX_OUTCOME_CRASH, 0, "the expert threw an exception");
}

}  // namespace cortex::sdk

#define CORTEX_EXPORT_PLUGIN(Class, manifest_ptr)                                      \
  extern "C" CORTEX_PLUGIN_EXPORT const cortex_plugin_api* cortex_plugin_entry(void) { \
    static const cortex_plugin_api api = {CORTEX_PLUGIN_ABI_VERSION,                   \
                                          sizeof(cortex_plugin_api),                   \
                                          (manifest_ptr),                              \
                                          &::cortex::sdk::CreateThunk<Class>,          \
                                          &::cortex::sdk::DestroyThunk<Class>,         \
                                          &::cortex::sdk::ExecuteThunk<Class>};        \
    return &api;                                                                       \
  }
