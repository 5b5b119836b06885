// Safetensors files: a validated, zero-copy view of a mapped file, model folders made of one or
// more such files, and a writer for the demo and benchmark models.
//
// On-disk layout (all integers little-endian):
//
//   +----------------+----------------------------+-------------------------------------+
//   | N: uint64 (8B) | header: N bytes JSON       | data section: size - 8 - N bytes    |
//   +----------------+----------------------------+-------------------------------------+
//   header = {"<tensor>": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, ...,
//             "__metadata__": {"<key>": "<value>", ...}}
//   data_offsets are relative to the start of the data section.
#include "engine/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <optional>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"

namespace tandem {
namespace {

using Json = nlohmann::json;

// The same bound as the reference implementation: a larger header is an attack, not a model.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;
// No real weight has more than a handful of dimensions; the bound keeps a hostile header from
// making us allocate a shape vector per byte.
constexpr size_t kMaxRank = 32;
// model.safetensors.index.json of the largest public models is a few MB.
constexpr size_t kMaxIndexBytes = 64u << 20;
constexpr char kMetadataKey[] = "__metadata__";
constexpr char kSingleFile[] = "model.safetensors";
constexpr char kIndexFile[] = "model.safetensors.index.json";

// The system absl has its own string_view type; StrCat does not take std::string_view.
absl::string_view AbslView(std::string_view s) { return absl::string_view(s.data(), s.size()); }

// Names come from an untrusted file: escape them and bound their length before they reach a
// message or a log line.
std::string Printable(absl::string_view s) {
  constexpr size_t kMaxChars = 200;
  std::string out = absl::CHexEscape(s.substr(0, kMaxChars));
  if (s.size() > kMaxChars) {
    out += "...";
  }
  return out;
}

absl::Status FileError(absl::StatusCode code, absl::string_view file, absl::string_view what) {
  return absl::Status(code, absl::StrCat(file, ": ", what));
}

absl::Status TensorError(absl::StatusCode code, absl::string_view file, absl::string_view tensor,
                         absl::string_view what) {
  return absl::Status(code, absl::StrCat(file, ": tensor '", Printable(tensor), "': ", what));
}

absl::Status TooShortError(absl::string_view file, size_t size) {
  return FileError(
      absl::StatusCode::kDataLoss, file,
      absl::StrCat("file is ", size, " bytes, shorter than the 8-byte header length (truncated?)"));
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ","), "]");
}

std::optional<DType> DTypeFromSafetensors(std::string_view s) {
  if (s == "F32") {
    return DType::kF32;
  }
  if (s == "F16") {
    return DType::kF16;
  }
  if (s == "BF16") {
    return DType::kBF16;
  }
  return std::nullopt;
}

const char* SafetensorsDTypeName(DType t) {
  switch (t) {
    case DType::kF32:
      return "F32";
    case DType::kF16:
      return "F16";
    case DType::kBF16:
      return "BF16";
  }
  return "F32";
}

// Bytes of a tensor, or nullopt when numel x element size does not fit in 64 bits. Zero
// dimensions do not excuse overflow in the others: a consumer multiplying two of the large ones
// would still overflow.
std::optional<uint64_t> CheckedByteSize(const std::vector<int64_t>& shape, DType dtype) {
  uint64_t bound = DTypeSize(dtype);
  bool has_zero = false;
  for (int64_t d : shape) {
    if (d == 0) {
      has_zero = true;
      continue;
    }
    if (__builtin_mul_overflow(bound, static_cast<uint64_t>(d), &bound)) {
      return std::nullopt;
    }
  }
  // TensorView::numel() is int64: keep the element count representable there.
  if (bound / DTypeSize(dtype) > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    return std::nullopt;
  }
  return has_zero ? 0 : bound;
}

// A JSON integer in [0, INT64_MAX]; floats, negatives and other types give nullopt.
std::optional<uint64_t> NonNegativeInt(const Json& v) {
  if (!v.is_number_unsigned()) {
    return std::nullopt;
  }
  const uint64_t u = v.get<uint64_t>();
  if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    return std::nullopt;
  }
  return u;
}

absl::StatusOr<std::string> ReadBoundedFile(const std::string& path, size_t max_bytes) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) {
    return absl::ErrnoToStatus(errno, absl::StrCat("cannot open ", path));
  }
  std::string out;
  char buf[1 << 16];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) {
    if (out.size() + n > max_bytes) {
      std::fclose(f);
      return FileError(absl::StatusCode::kInvalidArgument, path,
                       absl::StrCat("larger than the ", max_bytes, "-byte limit"));
    }
    out.append(buf, n);
  }
  const bool failed = std::ferror(f) != 0;
  std::fclose(f);
  if (failed) {
    return FileError(absl::StatusCode::kDataLoss, path, "read error");
  }
  return out;
}

// Shard names come from the index file; anything but a plain file name could reach outside
// the model folder.
bool IsPlainFileName(std::string_view name) {
  return !name.empty() && name.find('/') == std::string_view::npos &&
         name.find('\\') == std::string_view::npos && name.find("..") == std::string_view::npos &&
         name.find('\0') == std::string_view::npos;
}

}  // namespace

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) {
    ::munmap(map_, map_size_);
  }
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat("cannot open ", path));
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return absl::ErrnoToStatus(err, absl::StrCat("cannot stat ", path));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return FileError(absl::StatusCode::kInvalidArgument, path, "not a regular file");
  }
  const size_t size = static_cast<size_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    return TooShortError(path, size);
  }
  // The mapping keeps its own reference to the file; the descriptor is not needed after this.
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_errno = errno;
  ::close(fd);
  if (map == MAP_FAILED) {
    return absl::ErrnoToStatus(map_errno, absl::StrCat("cannot map ", path));
  }
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->map_ = map;  // owned from here on: unmapped by the destructor on every path
  file->map_size_ = size;
  if (absl::Status s = file->ParseImage(static_cast<const std::byte*>(map), size, path); !s.ok()) {
    return s;
  }
  return file;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::FromBuffer(const std::byte* bytes,
                                                                             size_t size,
                                                                             std::string name) {
  if (bytes == nullptr && size > 0) {
    return FileError(absl::StatusCode::kInvalidArgument, name, "null buffer");
  }
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  if (absl::Status s = file->ParseImage(bytes, size, name); !s.ok()) {
    return s;
  }
  return file;
}

absl::Status SafetensorsFile::ParseImage(const std::byte* bytes, size_t size,
                                         const std::string& name) {
  if (size < 8) {
    return TooShortError(name, size);
  }
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) {
    header_len = (header_len << 8) | static_cast<uint8_t>(bytes[i]);
  }
  if (header_len > kMaxHeaderBytes) {
    return FileError(absl::StatusCode::kInvalidArgument, name,
                     absl::StrCat("header length ", header_len, " exceeds the ", kMaxHeaderBytes,
                                  "-byte limit"));
  }
  if (header_len > size - 8) {
    return FileError(absl::StatusCode::kDataLoss, name,
                     absl::StrCat("header length ", header_len, " runs past the end of the ", size,
                                  "-byte file (truncated?)"));
  }

  const char* header = reinterpret_cast<const char*>(bytes + 8);
  Json root;
  try {
    root = Json::parse(header, header + header_len);
  } catch (const Json::exception& e) {
    return FileError(absl::StatusCode::kInvalidArgument, name,
                     absl::StrCat("malformed JSON header: ", e.what()));
  }
  if (!root.is_object()) {
    return FileError(absl::StatusCode::kInvalidArgument, name,
                     absl::StrCat("header is a JSON ", root.type_name(), ", expected an object"));
  }

  const std::byte* data = bytes + 8 + header_len;
  const uint64_t data_size = size - 8 - header_len;
  struct Extent {
    uint64_t begin;
    uint64_t end;
    const std::string* tensor;
  };
  std::vector<Extent> extents;
  extents.reserve(root.size());

  for (auto it = root.begin(); it != root.end(); ++it) {
    const std::string& tensor = it.key();
    const Json& entry = it.value();
    if (tensor == kMetadataKey) {
      if (!entry.is_object()) {
        return FileError(absl::StatusCode::kInvalidArgument, name,
                         "__metadata__ is not a JSON object");
      }
      for (auto m = entry.begin(); m != entry.end(); ++m) {
        if (!m.value().is_string()) {
          return FileError(
              absl::StatusCode::kInvalidArgument, name,
              absl::StrCat("__metadata__ value of '", Printable(m.key()), "' is not a string"));
        }
        metadata_.emplace(m.key(), m.value().get<std::string>());
      }
      continue;
    }
    if (!entry.is_object()) {
      return TensorError(absl::StatusCode::kInvalidArgument, name, tensor,
                         "entry is not a JSON object");
    }

    const auto dtype_it = entry.find("dtype");
    if (dtype_it == entry.end() || !dtype_it->is_string()) {
      return TensorError(absl::StatusCode::kInvalidArgument, name, tensor,
                         "dtype is missing or not a string");
    }
    const std::string& dtype_name = dtype_it->get_ref<const std::string&>();
    const std::optional<DType> dtype = DTypeFromSafetensors(dtype_name);
    if (!dtype.has_value()) {
      return TensorError(absl::StatusCode::kInvalidArgument, name, tensor,
                         absl::StrCat("unsupported dtype '", Printable(dtype_name),
                                      "' (supported: F32, F16, BF16)"));
    }

    const auto shape_it = entry.find("shape");
    if (shape_it == entry.end() || !shape_it->is_array()) {
      return TensorError(absl::StatusCode::kInvalidArgument, name, tensor,
                         "shape is missing or not an array");
    }
    if (shape_it->size() > kMaxRank) {
      return TensorError(absl::StatusCode::kInvalidArgument, name, tensor,
                         absl::StrCat("shape has ", shape_it->size(), " dimensions; at most ",
                                      kMaxRank, " are supported"));
    }
    std::vector<int64_t> shape;
    shape.reserve(shape_it->size());
    for (size_t i = 0; i < shape_it->size(); ++i) {
      const std::optional<uint64_t> d = NonNegativeInt((*shape_it)[i]);
      if (!d.has_value()) {
        return TensorError(absl::StatusCode::kInvalidArgument, name, tensor,
                           absl::StrCat("shape[", i, "] = ", (*shape_it)[i].dump(),
                                        " is not a non-negative 64-bit integer"));
      }
      shape.push_back(static_cast<int64_t>(*d));
    }

    const auto offsets_it = entry.find("data_offsets");
    if (offsets_it == entry.end() || !offsets_it->is_array() || offsets_it->size() != 2) {
      return TensorError(absl::StatusCode::kInvalidArgument, name, tensor,
                         "data_offsets is missing or not an array of two integers");
    }
    const std::optional<uint64_t> begin = NonNegativeInt((*offsets_it)[0]);
    const std::optional<uint64_t> end = NonNegativeInt((*offsets_it)[1]);
    if (!begin.has_value() || !end.has_value()) {
      return TensorError(absl::StatusCode::kInvalidArgument, name, tensor,
                         absl::StrCat("data_offsets ", offsets_it->dump(),
                                      " are not non-negative 64-bit integers"));
    }
    if (*begin > *end) {
      return TensorError(absl::StatusCode::kInvalidArgument, name, tensor,
                         absl::StrCat("data_offsets [", *begin, ",", *end, "]: begin > end"));
    }
    if (*end > data_size) {
      return TensorError(
          absl::StatusCode::kDataLoss, name, tensor,
          absl::StrCat("data_offsets [", *begin, ",", *end, "] run past the end of the ", data_size,
                       "-byte data section (truncated?)"));
    }

    const std::optional<uint64_t> nbytes = CheckedByteSize(shape, *dtype);
    if (!nbytes.has_value()) {
      return TensorError(absl::StatusCode::kInvalidArgument, name, tensor,
                         absl::StrCat("shape ", ShapeString(shape), " of ", dtype_name,
                                      " overflows 64-bit sizes"));
    }
    if (*nbytes != *end - *begin) {
      return TensorError(
          absl::StatusCode::kInvalidArgument, name, tensor,
          absl::StrCat("shape ", ShapeString(shape), " of ", dtype_name, " needs ", *nbytes,
                       " bytes but data_offsets [", *begin, ",", *end, "] span ", *end - *begin));
    }

    TensorView view;
    view.name = tensor;
    view.dtype = *dtype;
    view.shape = std::move(shape);
    view.data = data + *begin;
    view.nbytes = static_cast<size_t>(*nbytes);
    const auto pos = tensors_.emplace(tensor, std::move(view)).first;
    if (*nbytes > 0) {
      extents.push_back({*begin, *end, &pos->first});
    }
  }

  // Overlapping tensors would alias each other's weights; a hostile file could use that to make
  // one tensor's bytes also read as another's. Once sorted by begin, any overlap shows up between
  // neighbours before a later pair.
  std::sort(extents.begin(), extents.end(), [](const Extent& a, const Extent& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  for (size_t i = 1; i < extents.size(); ++i) {
    if (extents[i].begin < extents[i - 1].end) {
      return TensorError(absl::StatusCode::kInvalidArgument, name, *extents[i].tensor,
                         absl::StrCat("data_offsets [", extents[i].begin, ",", extents[i].end,
                                      "] overlap tensor '", Printable(*extents[i - 1].tensor),
                                      "' [", extents[i - 1].begin, ",", extents[i - 1].end, "]"));
    }
  }
  return absl::OkStatus();
}

const TensorView* SafetensorsFile::Find(std::string_view name) const {
  const auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

absl::StatusOr<std::unique_ptr<WeightSet>> WeightSet::OpenDir(const std::string& dir) {
  namespace fs = std::filesystem;
  auto set = std::make_unique<WeightSet>();
  set->dir_ = dir;
  const fs::path root(dir);
  const std::string single_path = (root / kSingleFile).string();
  const std::string index_path = (root / kIndexFile).string();
  std::error_code ec;

  // The file each tensor came from, for duplicate reports.
  std::map<std::string, std::string, std::less<>> origin;
  auto add_file = [&](std::unique_ptr<SafetensorsFile> file,
                      const std::string& file_name) -> absl::Status {
    for (const auto& [tensor, view] : file->tensors()) {
      auto [it, inserted] = origin.emplace(tensor, file_name);
      if (!inserted) {
        return absl::InvalidArgumentError(
            absl::StrCat(dir, ": tensor '", Printable(tensor), "' is stored in both '",
                         Printable(it->second), "' and '", Printable(file_name), "'"));
      }
      set->index_.emplace(tensor, &view);
    }
    set->files_.push_back(std::move(file));
    return absl::OkStatus();
  };

  if (fs::is_regular_file(single_path, ec)) {
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(single_path);
    if (!file.ok()) {
      return file.status();
    }
    if (absl::Status s = add_file(*std::move(file), kSingleFile); !s.ok()) {
      return s;
    }
    return set;
  }

  if (!fs::exists(index_path, ec)) {
    if (!fs::is_directory(root, ec)) {
      return absl::NotFoundError(
          absl::StrCat("model folder '", dir, "' does not exist or is not a directory"));
    }
    return absl::NotFoundError(absl::StrCat(
        "no weights in '", dir, "': expected ", kSingleFile, " or ", kIndexFile,
        " (a Hugging Face folder saved with safe_serialization=True; .bin/.pth checkpoints are "
        "not supported)"));
  }

  absl::StatusOr<std::string> text = ReadBoundedFile(index_path, kMaxIndexBytes);
  if (!text.ok()) {
    return text.status();
  }
  Json index;
  try {
    index = Json::parse(*text);
  } catch (const Json::exception& e) {
    return FileError(absl::StatusCode::kInvalidArgument, index_path,
                     absl::StrCat("malformed JSON: ", e.what()));
  }
  if (!index.is_object()) {
    return FileError(absl::StatusCode::kInvalidArgument, index_path, "not a JSON object");
  }
  const auto map_it = index.find("weight_map");
  if (map_it == index.end() || !map_it->is_object() || map_it->empty()) {
    return FileError(absl::StatusCode::kInvalidArgument, index_path,
                     "weight_map is missing, not an object, or empty");
  }

  // Validate every shard name before touching the file system with any of them.
  std::map<std::string, SafetensorsFile*> shards;
  for (auto it = map_it->begin(); it != map_it->end(); ++it) {
    if (!it.value().is_string()) {
      return FileError(
          absl::StatusCode::kInvalidArgument, index_path,
          absl::StrCat("weight_map entry for tensor '", Printable(it.key()), "' is not a string"));
    }
    const std::string& shard = it.value().get_ref<const std::string&>();
    if (!IsPlainFileName(shard)) {
      return FileError(
          absl::StatusCode::kInvalidArgument, index_path,
          absl::StrCat("weight_map entry for tensor '", Printable(it.key()), "' names shard '",
                       Printable(shard), "', which is not a plain file name"));
    }
    shards.emplace(shard, nullptr);
  }
  for (auto& [shard, file_ptr] : shards) {
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
        SafetensorsFile::Open((root / shard).string());
    if (!file.ok()) {
      return absl::Status(file.status().code(),
                          absl::StrCat(index_path, " lists shard '", Printable(shard),
                                       "': ", file.status().message()));
    }
    file_ptr = file->get();
    if (absl::Status s = add_file(*std::move(file), shard); !s.ok()) {
      return s;
    }
  }
  for (auto it = map_it->begin(); it != map_it->end(); ++it) {
    const std::string& shard = it.value().get_ref<const std::string&>();
    if (shards.at(shard)->Find(it.key()) == nullptr) {
      return FileError(absl::StatusCode::kInvalidArgument, index_path,
                       absl::StrCat("tensor '", Printable(it.key()), "' is assigned to shard '",
                                    Printable(shard), "' but that shard does not hold it"));
    }
  }
  return set;
}

const TensorView* WeightSet::Find(std::string_view name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second;
}

absl::StatusOr<const TensorView*> WeightSet::Require(std::string_view name,
                                                     const std::vector<int64_t>& shape) const {
  const TensorView* t = Find(name);
  if (t == nullptr) {
    return absl::NotFoundError(absl::StrCat("missing tensor '", AbslView(name), "' in ", dir_));
  }
  if (t->shape != shape) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", AbslView(name), "' has shape ",
                                                   ShapeString(t->shape), ", expected ",
                                                   ShapeString(shape)));
  }
  return t;
}

size_t WeightSet::total_bytes() const {
  size_t total = 0;
  for (const auto& [name, view] : index_) {
    total += view->nbytes;
  }
  return total;
}

absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  std::vector<const TensorToWrite*> sorted;
  sorted.reserve(tensors.size());
  for (const TensorToWrite& t : tensors) {
    sorted.push_back(&t);
  }
  std::sort(sorted.begin(), sorted.end(),
            [](const TensorToWrite* a, const TensorToWrite* b) { return a->name < b->name; });

  Json header = Json::object();
  if (!metadata.empty()) {
    Json meta = Json::object();
    for (const auto& [key, value] : metadata) {
      meta[key] = value;
    }
    header[kMetadataKey] = std::move(meta);
  }
  uint64_t offset = 0;
  for (size_t i = 0; i < sorted.size(); ++i) {
    const TensorToWrite& t = *sorted[i];
    if (t.name.empty() || t.name == kMetadataKey) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": invalid tensor name '", Printable(t.name), "'"));
    }
    if (i > 0 && sorted[i - 1]->name == t.name) {
      return TensorError(absl::StatusCode::kInvalidArgument, path, t.name, "duplicate name");
    }
    for (int64_t d : t.shape) {
      if (d < 0) {
        return TensorError(absl::StatusCode::kInvalidArgument, path, t.name,
                           absl::StrCat("negative dimension in shape ", ShapeString(t.shape)));
      }
    }
    const std::optional<uint64_t> nbytes = CheckedByteSize(t.shape, t.dtype);
    if (!nbytes.has_value() || *nbytes != t.data.size()) {
      return TensorError(
          absl::StatusCode::kInvalidArgument, path, t.name,
          absl::StrCat("holds ", t.data.size(), " bytes, but shape ", ShapeString(t.shape), " of ",
                       SafetensorsDTypeName(t.dtype), " needs ",
                       nbytes.has_value() ? absl::StrCat(*nbytes) : "too many"));
    }
    Json entry = Json::object();
    entry["dtype"] = SafetensorsDTypeName(t.dtype);
    entry["shape"] = t.shape;
    entry["data_offsets"] = Json::array({offset, offset + *nbytes});
    header[t.name] = std::move(entry);
    offset += *nbytes;
  }

  std::string text;
  try {
    text = header.dump();
  } catch (const Json::exception& e) {  // a name or metadata string that is not UTF-8
    return absl::InvalidArgumentError(absl::StrCat(path, ": cannot encode header: ", e.what()));
  }
  // Pad so the data section starts 8-byte aligned, as the reference writer does.
  text.append((8 - text.size() % 8) % 8, ' ');
  unsigned char len_bytes[8];
  for (int i = 0; i < 8; ++i) {
    len_bytes[i] = static_cast<unsigned char>(static_cast<uint64_t>(text.size()) >> (8 * i));
  }

  // Write beside the target and rename, so a reader never sees a half-written file.
  const std::string tmp_path = absl::StrCat(path, ".tmp.", ::getpid());
  std::FILE* f = std::fopen(tmp_path.c_str(), "wb");
  if (f == nullptr) {
    return absl::ErrnoToStatus(errno, absl::StrCat("cannot create ", tmp_path));
  }
  bool ok = std::fwrite(len_bytes, 1, sizeof(len_bytes), f) == sizeof(len_bytes) &&
            std::fwrite(text.data(), 1, text.size(), f) == text.size();
  for (size_t i = 0; ok && i < sorted.size(); ++i) {
    const std::vector<std::byte>& data = sorted[i]->data;
    ok = data.empty() || std::fwrite(data.data(), 1, data.size(), f) == data.size();
  }
  int err = ok ? 0 : errno;
  if (std::fclose(f) != 0 && ok) {
    ok = false;
    err = errno;
  }
  if (!ok) {
    std::remove(tmp_path.c_str());
    return absl::ErrnoToStatus(err, absl::StrCat("cannot write ", tmp_path));
  }
  if (std::rename(tmp_path.c_str(), path.c_str()) != 0) {
    err = errno;
    std::remove(tmp_path.c_str());
    return absl::ErrnoToStatus(err, absl::StrCat("cannot rename ", tmp_path, " to ", path));
  }
  return absl::OkStatus();
}

}  // namespace tandem
