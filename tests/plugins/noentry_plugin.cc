// A shared library that is not a Cortex plugin: it exports a function, but no entry point.
extern "C" __attribute__((visibility("default"))) int some_other_library_function(void) {
  return 42;
}
