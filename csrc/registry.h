// Each kernel family registers its pybind11 definitions here, so that adding a family never edits a
// shared file: `ONEPASS_REGISTER(register_fn)` at namespace scope of the family's binding source.
#pragma once
#include <pybind11/pybind11.h>

#include <vector>

namespace onepass {

using Registrar = void (*)(pybind11::module_&);

std::vector<Registrar>& registrars();

struct RegisterOps {
  explicit RegisterOps(Registrar fn) { registrars().push_back(fn); }
};

}  // namespace onepass

#define ONEPASS_REGISTER(fn) static ::onepass::RegisterOps onepass_register_##fn(fn)
