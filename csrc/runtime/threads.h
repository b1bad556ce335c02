#pragma once

namespace pyxf {
void set_num_threads(int n);
int num_threads();
}  // namespace pyxf
