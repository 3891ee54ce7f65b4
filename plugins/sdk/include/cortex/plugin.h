/* Cortex expert plugin ABI.
 *
 * A plugin is a shared library exporting one C entry point, CORTEX_PLUGIN_ENTRY_NAME,
 * that returns a cortex_plugin_api whose first field is the ABI version it was built
 * against. Everything that crosses the boundary is plain C: no exceptions, no C++
 * types, no ownership transfer except through the functions named here.
 */
#ifndef CORTEX_PLUGIN_H_
#define CORTEX_PLUGIN_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CORTEX_PLUGIN_ABI_VERSION 1u
#define CORTEX_PLUGIN_ENTRY_NAME "cortex_plugin_entry"

/* Puts the entry point in the dynamic symbol table even when the plugin is built with
 * -fvisibility=hidden (as it should be): the host finds it by name (dlsym, through
 * Boost.DLL), so a plugin itself needs no Boost. */
#ifndef CORTEX_PLUGIN_EXPORT
#if defined(__GNUC__) || defined(__clang__)
#define CORTEX_PLUGIN_EXPORT __attribute__((__visibility__("default")))
#else
#define CORTEX_PLUGIN_EXPORT
#endif
#endif

typedef enum cortex_outcome_kind {
  CORTEX_OUTCOME_SUCCESS = 0,
  CORTEX_OUTCOME_FAILURE = 1, /* the expert tried and failed */
  CORTEX_OUTCOME_TIMEOUT = 2, /* the expert gave up at its deadline */
  CORTEX_OUTCOME_CRASH = 3,   /* something the expert ran died */
  CORTEX_OUTCOME_REJECTED = 4 /* the expert declined: not its kind of task */
} cortex_outcome_kind;

/* The plugin cannot run without instance configuration (e.g. `command` needs `run`),
 * so no default instance is created for it. */
#define CORTEX_MANIFEST_REQUIRES_CONFIG 1u

typedef struct cortex_manifest {
  const char* name; /* [a-z0-9._-]{1,64}; the default instance's name */
  const char* version;
  const char* description;
  const char* const* keywords;    /* NULL-terminated, may be NULL */
  const char* const* examples;    /* example tasks, NULL-terminated, may be NULL */
  const char* const* config_keys; /* instance settings it accepts, NULL-terminated */
  uint32_t capacity;              /* tasks it runs at once (>= 1) */
  uint32_t timeout_ms;            /* default per-task timeout */
  uint32_t flags;                 /* CORTEX_MANIFEST_* */
} cortex_manifest;

typedef struct cortex_tag {
  const char* key;
  const char* value;
} cortex_tag;

typedef struct cortex_task {
  const char* id;
  const char* text; /* UTF-8 */
  const cortex_tag* tags;
  size_t n_tags;
  int64_t deadline_unix_ms; /* the host stops waiting at this moment */
} cortex_task;

/* What the host offers a running task. All calls are thread-safe. */
typedef struct cortex_host {
  void* ctx;
  /* Non-zero once the host no longer wants the result (timeout, shutdown). */
  int (*cancelled)(void* ctx);
  /* Appends to the task's output; the host keeps a bounded prefix. */
  void (*write_output)(void* ctx, const char* data, size_t len);
} cortex_host;

typedef struct cortex_result {
  int32_t kind;   /* cortex_outcome_kind */
  double quality; /* [0,1]; negative: the host's default (1 on success, 0 otherwise) */
  /* Short reason for a non-success, owned by the plugin, valid until destroy(). */
  const char* error;
} cortex_result;

typedef struct cortex_plugin_api {
  uint32_t abi_version; /* must stay the first field: CORTEX_PLUGIN_ABI_VERSION */
  uint32_t struct_size; /* sizeof(cortex_plugin_api) as the plugin saw it */
  const cortex_manifest* manifest;
  /* Creates an instance from a JSON object of settings; NULL on error, with a message
   * (starting with the offending key, "key: ...") written to err. */
  void* (*create)(const char* settings_json, char* err, size_t err_len);
  void (*destroy)(void* instance);
  /* Runs one task. May be called from several threads at once, up to capacity. */
  cortex_result (*execute)(void* instance, const cortex_task* task, const cortex_host* host);
} cortex_plugin_api;

typedef const cortex_plugin_api* (*cortex_plugin_entry_fn)(void);

#ifdef __cplusplus
}
#endif

#endif /* CORTEX_PLUGIN_H_ */
