// The CPU library as one translation unit, so the torch headers are parsed once: the kernels compile
// on first use and on every CI run, and each extra unit would add its own ~20 s of header parsing.
// Every included file holds one op family and compiles on its own as well.
#include "torch_bindings.cpp"  // NOLINT(build/include)
#include "cpu/similarity.cpp"  // NOLINT(build/include)
#include "cpu/merge.cpp"       // NOLINT(build/include)
#include "cpu/importance.cpp"  // NOLINT(build/include)
#include "cpu/gather.cpp"      // NOLINT(build/include)
#include "cpu/lsh.cpp"         // NOLINT(build/include)
