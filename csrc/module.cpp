// The Python module vsd_ext._C: importing it runs the static TORCH_LIBRARY registrations of every
// translation unit linked into the .so. It also reports how the binary was built (compilers,
// CUDA) without pulling pybind11 into the build: plain CPython API, a few seconds to compile.
#include <Python.h>
#include <torch/version.h>

#include <string>
#include <vector>

#if VSD_EXT_WITH_CUDA
namespace vsd_ext::cuda {
int nvcc_version();                 // defined in csrc/cuda/build_info.cu (compiled by nvcc)
std::vector<int> compiled_archs();  // __CUDA_ARCH_LIST__ of that translation unit, e.g. {900}
}  // namespace vsd_ext::cuda
#endif

namespace {

std::string cxx_compiler() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#else
  return "unknown";
#endif
}

PyObject* compiled_build_info(PyObject*, PyObject*) {
  PyObject* info = PyDict_New();
  auto set = [&](const char* key, PyObject* value) {
    PyDict_SetItemString(info, key, value);
    Py_DECREF(value);
  };
  set("torch_version", PyUnicode_FromString(TORCH_VERSION));
  set("cxx_compiler", PyUnicode_FromString(cxx_compiler().c_str()));
#ifdef _OPENMP
  set("openmp", Py_NewRef(Py_True));
#else
  set("openmp", Py_NewRef(Py_False));
#endif
#if VSD_EXT_WITH_CUDA
  const int v = vsd_ext::cuda::nvcc_version();
  const std::string nvcc =
      "nvcc " + std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
  PyObject* archs = PyList_New(0);
  for (int a : vsd_ext::cuda::compiled_archs()) {
    PyObject* s = PyUnicode_FromString(
        (std::to_string(a / 100) + "." + std::to_string((a % 100) / 10)).c_str());
    PyList_Append(archs, s);
    Py_DECREF(s);
  }
  set("with_cuda", Py_NewRef(Py_True));
  set("cuda_compiler", PyUnicode_FromString(nvcc.c_str()));
  set("cuda_archs", archs);
#else
  set("with_cuda", Py_NewRef(Py_False));
  set("cuda_compiler", Py_NewRef(Py_None));
  set("cuda_archs", PyList_New(0));
#endif
  return info;
}

PyMethodDef methods[] = {
    {"compiled_build_info", compiled_build_info, METH_NOARGS,
     "Compiler versions and whether CUDA kernels are linked into this binary."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                          "vsd_ext compiled kernels (ops live in torch.ops.vsd_ext)", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
