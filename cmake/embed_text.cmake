# Script mode (cmake -P), for cortex_embed: writes OUT, a C++ file defining SYMBOL as the
# text of IN in one raw string literal.
file(READ ${IN} content)
string(FIND "${content}" ")cortex_embed\"" clash)
if(NOT clash EQUAL -1)
  message(FATAL_ERROR "${IN} contains the raw string delimiter )cortex_embed\"")
endif()
file(WRITE ${OUT}.tmp "// Generated from ${IN} by cmake/embed_text.cmake: do not edit.\n"
  "namespace cortex::embedded {\nextern const char ${SYMBOL}[];\n"
  "const char ${SYMBOL}[] = R\"cortex_embed(${content})cortex_embed\";\n}\n")
file(RENAME ${OUT}.tmp ${OUT})
