// The Python module vsd_ext._C, the CPU library: importing it runs the static TORCH_LIBRARY
// registrations of every translation unit linked into it (every schema, the CPU kernels). The
// CUDA kernels live in a separate library, vsd_ext._C_cuda (cuda/build_info.cu reports on it),
// which vsd_ext loads only when torch has CUDA: nothing here may reference CUDA. It also reports
// how this binary was built without pulling pybind11 into the build: plain CPython API.
#include <Python.h>
#include <torch/version.h>

#include <string>

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
  return info;
}

PyMethodDef methods[] = {
    {"compiled_build_info", compiled_build_info, METH_NOARGS,
     "The torch version, C++ compiler and OpenMP this library was built with."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                          "vsd_ext compiled kernels (ops live in torch.ops.vsd_ext)", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
