// Chat-template renderer: a lexer, a parser and a tree-walking evaluator for the subset of Jinja2
// that Hugging Face chat templates use (see chat_template.h for the environment it reproduces).
// Python semantics are followed where templates can observe them: str()/repr() of values,
// floor division and modulo, truthiness, Undefined, code-point string indexing, json.dumps.
#include "engine/chat_template.h"

#include <unicode/uchar.h>
#include <unicode/ustring.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <initializer_list>
#include <limits>
#include <optional>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

// Status plumbing (Debian's Abseil has no public status macros).
#define CT_RETURN_IF_ERROR(expr)      \
  do {                                \
    absl::Status ct_status_ = (expr); \
    if (!ct_status_.ok()) {           \
      return ct_status_;              \
    }                                 \
  } while (0)
#define CT_CONCAT_INNER(a, b) a##b
#define CT_CONCAT(a, b) CT_CONCAT_INNER(a, b)
#define CT_ASSIGN_OR_RETURN(lhs, expr) \
  CT_ASSIGN_OR_RETURN_IMPL(CT_CONCAT(ct_so_, __LINE__), lhs, expr)
#define CT_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                             \
  if (!tmp.ok()) {                               \
    return tmp.status();                         \
  }                                              \
  lhs = std::move(*tmp)

namespace tandem {
namespace chat_template_internal {
namespace {

// Bounds that keep a hostile template from hanging or exhausting the router. Every evaluated
// expression and statement is a step; producing strings and lists costs extra steps in
// proportion to their size, so the total memory a render can allocate is bounded too.
constexpr size_t kMaxOutputBytes = 16u << 20;
constexpr size_t kMaxStringBytes = 16u << 20;
constexpr int64_t kMaxSteps = 10'000'000;
constexpr int64_t kBytesPerStep = 16;
constexpr int64_t kStepsPerListItem = 4;
constexpr int kMaxCallDepth = 64;
// Nesting of values (lists in lists...), of parsed expressions and of statements: the renderer
// recurses over all three.
constexpr int kMaxValueDepth = 512;
constexpr int kMaxExprDepth = 256;
constexpr int kMaxParseDepth = 128;
// jinja2's sandbox refuses range() beyond this many items.
constexpr int64_t kMaxRange = 100000;

// ---------------------------------------------------------------------------------------------
// UTF-8 and Python string helpers. Strings are byte strings holding UTF-8; stray bytes count as
// one character each so that walking untrusted text always makes progress.

size_t Utf8Len(unsigned char lead) {
  if (lead < 0x80) {
    return 1;
  }
  if ((lead & 0xE0) == 0xC0) {
    return 2;
  }
  if ((lead & 0xF0) == 0xE0) {
    return 3;
  }
  if ((lead & 0xF8) == 0xF0) {
    return 4;
  }
  return 1;
}

// Decodes the code point at `*pos` and advances past it. Malformed sequences yield the lead byte.
char32_t NextCodePoint(std::string_view s, size_t* pos) {
  const auto lead = static_cast<unsigned char>(s[*pos]);
  size_t len = Utf8Len(lead);
  if (len == 1 || *pos + len > s.size()) {
    ++*pos;
    return lead;
  }
  char32_t cp = lead & (0x7F >> len);
  for (size_t k = 1; k < len; ++k) {
    const auto c = static_cast<unsigned char>(s[*pos + k]);
    if ((c & 0xC0) != 0x80) {
      ++*pos;
      return lead;
    }
    cp = (cp << 6) | (c & 0x3F);
  }
  *pos += len;
  return cp;
}

void AppendUtf8(char32_t cp, std::string* out) {
  if (cp >= 0xD800 && cp <= 0xDFFF) {
    cp = 0xFFFD;  // lone surrogates (from "\ud800" escapes) cannot be encoded
  }
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x110000) {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->append("\xEF\xBF\xBD");
  }
}

bool IsAscii(std::string_view s) {
  for (char c : s) {
    if (static_cast<unsigned char>(c) >= 0x80) {
      return false;
    }
  }
  return true;
}

// Byte offsets of each code point's start, plus s.size() at the end.
std::vector<size_t> CodePointStarts(std::string_view s) {
  std::vector<size_t> starts;
  starts.reserve(s.size() + 1);
  size_t pos = 0;
  while (pos < s.size()) {
    starts.push_back(pos);
    NextCodePoint(s, &pos);
  }
  starts.push_back(s.size());
  return starts;
}

size_t CodePointCount(std::string_view s) {
  if (IsAscii(s)) {
    return s.size();
  }
  size_t n = 0;
  size_t pos = 0;
  while (pos < s.size()) {
    NextCodePoint(s, &pos);
    ++n;
  }
  return n;
}

// Python's str.isspace() for one code point.
bool IsPySpace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
         c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
         c == 0x205F || c == 0x3000;
}

// Python's str.strip/lstrip/rstrip: whitespace, or the code points of `chars`.
std::string_view PyStrip(std::string_view s, bool left, bool right,
                         const std::optional<std::string>& chars) {
  std::vector<char32_t> set;
  if (chars) {
    size_t p = 0;
    while (p < chars->size()) {
      set.push_back(NextCodePoint(*chars, &p));
    }
  }
  auto strip_it = [&](char32_t c) {
    return chars ? std::find(set.begin(), set.end(), c) != set.end() : IsPySpace(c);
  };
  size_t begin = 0;
  size_t end = s.size();
  if (left) {
    while (begin < end) {
      size_t p = begin;
      if (!strip_it(NextCodePoint(s, &p))) {
        break;
      }
      begin = p;
    }
  }
  if (right) {
    while (end > begin) {
      size_t start = end - 1;
      while (start > begin && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80 &&
             end - start < 4) {
        --start;
      }
      size_t p = start;
      char32_t c = NextCodePoint(s, &p);
      if (p != end) {  // a stray continuation byte: step back one byte only
        start = end - 1;
        p = start;
        c = NextCodePoint(s, &p);
      }
      if (!strip_it(c)) {
        break;
      }
      end = start;
    }
  }
  return s.substr(begin, end - begin);
}

bool AllPySpace(std::string_view s) {
  return !s.empty() && PyStrip(s, true, false, std::nullopt).empty();
}

// Full Unicode case mapping through ICU (so "ß".upper() is "SS", as in Python).
std::string CaseMap(std::string_view s, bool upper) {
  if (IsAscii(s)) {
    std::string out(s);
    for (char& c : out) {
      c = upper ? static_cast<char>(std::toupper(static_cast<unsigned char>(c)))
                : static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    }
    return out;
  }
  std::u16string wide;
  size_t p = 0;
  while (p < s.size()) {
    char32_t c = NextCodePoint(s, &p);
    if (c >= 0x10000) {
      c -= 0x10000;
      wide.push_back(static_cast<char16_t>(0xD800 + (c >> 10)));
      wide.push_back(static_cast<char16_t>(0xDC00 + (c & 0x3FF)));
    } else {
      wide.push_back(static_cast<char16_t>(c));
    }
  }
  std::u16string mapped(wide.size() * 3 + 4, u'\0');
  UErrorCode err = U_ZERO_ERROR;
  int32_t n = upper ? u_strToUpper(mapped.data(), static_cast<int32_t>(mapped.size()), wide.data(),
                                   static_cast<int32_t>(wide.size()), "", &err)
                    : u_strToLower(mapped.data(), static_cast<int32_t>(mapped.size()), wide.data(),
                                   static_cast<int32_t>(wide.size()), "", &err);
  if (U_FAILURE(err) || n < 0) {
    return std::string(s);
  }
  std::string out;
  out.reserve(s.size());
  for (int32_t k = 0; k < n; ++k) {
    char32_t c = mapped[k];
    if (c >= 0xD800 && c <= 0xDBFF && k + 1 < n && mapped[k + 1] >= 0xDC00 &&
        mapped[k + 1] <= 0xDFFF) {
      c = 0x10000 + ((c - 0xD800) << 10) + (mapped[k + 1] - 0xDC00);
      ++k;
    }
    AppendUtf8(c, &out);
  }
  return out;
}

std::string CodePointToString(char32_t c) {
  std::string s;
  AppendUtf8(c, &s);
  return s;
}

bool IsCased(char32_t c) { return u_hasBinaryProperty(static_cast<UChar32>(c), UCHAR_CASED); }

// Full title-case mapping of one code point, as Python's str.title() applies it: a real
// title-case letter where one exists ("ǆ" -> "ǅ"), otherwise the full upper-case mapping with its
// tail lower-cased ("ß" -> "Ss", "ﬁ" -> "Fi").
std::string TitleCaseChar(char32_t c) {
  auto title = static_cast<char32_t>(u_totitle(static_cast<UChar32>(c)));
  if (title != static_cast<char32_t>(u_toupper(static_cast<UChar32>(c)))) {
    return CodePointToString(title);
  }
  std::string upper = CaseMap(CodePointToString(c), true);
  size_t p = 0;
  NextCodePoint(upper, &p);
  return upper.substr(0, p) + CaseMap(std::string_view(upper).substr(p), false);
}

// Python's str.capitalize(): first character in title case, the rest lower case.
std::string PyCapitalize(std::string_view s) {
  if (s.empty()) {
    return "";
  }
  size_t p = 0;
  char32_t first = NextCodePoint(s, &p);
  return TitleCaseChar(first) + CaseMap(s.substr(p), false);
}

// Python's str.title(): a cased character after an uncased one starts a word.
std::string PyTitle(std::string_view s) {
  std::string out;
  bool previous_cased = false;
  size_t p = 0;
  while (p < s.size()) {
    size_t start = p;
    char32_t c = NextCodePoint(s, &p);
    if (previous_cased) {
      out += CaseMap(s.substr(start, p - start), false);
    } else {
      out += TitleCaseChar(c);
    }
    previous_cased = IsCased(c);
  }
  return out;
}

// jinja2's |title filter: words are split at runs of "-", whitespace and opening brackets; each
// word gets its first character upper-cased and the rest lower-cased.
std::string JinjaTitle(std::string_view s) {
  auto is_sep = [](char32_t c) {
    return c == '-' || c == '(' || c == '{' || c == '[' || c == '<' || IsPySpace(c);
  };
  std::string out;
  size_t p = 0;
  while (p < s.size()) {
    size_t start = p;
    char32_t c = NextCodePoint(s, &p);
    if (is_sep(c)) {
      out.append(s.substr(start, p - start));
      continue;
    }
    size_t word_end = p;
    while (word_end < s.size()) {
      size_t q = word_end;
      if (is_sep(NextCodePoint(s, &q))) {
        break;
      }
      word_end = q;
    }
    out += CaseMap(s.substr(start, p - start), true);
    out += CaseMap(s.substr(p, word_end - p), false);
    p = word_end;
  }
  return out;
}

// Python's repr() of a float ("short" style: the shortest string that round-trips, fixed
// notation for exponents in [-4, 16)).
std::string FormatFloat(double d) {
  if (std::isnan(d)) {
    return "nan";
  }
  if (std::isinf(d)) {
    return d < 0 ? "-inf" : "inf";
  }
  if (d == 0) {
    return std::signbit(d) ? "-0.0" : "0.0";
  }
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), d, std::chars_format::scientific);
  std::string_view sci(buf, static_cast<size_t>(res.ptr - buf));
  std::string out;
  if (sci.front() == '-') {
    out.push_back('-');
    sci.remove_prefix(1);
  }
  size_t e_pos = sci.find('e');
  std::string digits;
  for (char c : sci.substr(0, e_pos)) {
    if (c != '.') {
      digits.push_back(c);
    }
  }
  int exp = 0;
  std::from_chars(sci.data() + e_pos + (sci[e_pos + 1] == '+' ? 2 : 1), sci.data() + sci.size(),
                  exp);
  if (exp >= -4 && exp < 16) {
    if (exp >= 0) {
      size_t int_len = static_cast<size_t>(exp) + 1;
      if (digits.size() <= int_len) {
        out += digits;
        out.append(int_len - digits.size(), '0');
        out += ".0";
      } else {
        out += digits.substr(0, int_len);
        out += ".";
        out += digits.substr(int_len);
      }
    } else {
      out += "0.";
      out.append(static_cast<size_t>(-exp - 1), '0');
      out += digits;
    }
    return out;
  }
  out.push_back(digits[0]);
  if (digits.size() > 1) {
    out.push_back('.');
    out.append(digits, 1);
  }
  out.push_back('e');
  out.push_back(exp < 0 ? '-' : '+');
  int a = exp < 0 ? -exp : exp;
  if (a < 10) {
    out.push_back('0');
  }
  out += std::to_string(a);
  return out;
}

void AppendHex(uint32_t v, int width, std::string* out) {
  static constexpr char kHex[] = "0123456789abcdef";
  for (int k = width - 1; k >= 0; --k) {
    out->push_back(kHex[(v >> (4 * k)) & 0xF]);
  }
}

// Python's repr() of a str.
void AppendStringRepr(std::string_view s, std::string* out) {
  bool has_single = s.find('\'') != std::string_view::npos;
  bool has_double = s.find('"') != std::string_view::npos;
  char quote = has_single && !has_double ? '"' : '\'';
  out->push_back(quote);
  size_t p = 0;
  while (p < s.size()) {
    size_t start = p;
    char32_t c = NextCodePoint(s, &p);
    if (c == static_cast<char32_t>(quote) || c == '\\') {
      out->push_back('\\');
      out->push_back(static_cast<char>(c));
    } else if (c == '\n') {
      out->append("\\n");
    } else if (c == '\r') {
      out->append("\\r");
    } else if (c == '\t') {
      out->append("\\t");
    } else if (c < 0x20 || c == 0x7F) {
      out->append("\\x");
      AppendHex(c, 2, out);
    } else if (c < 0x80) {
      out->push_back(static_cast<char>(c));
    } else {
      // Python escapes the "Other" and "Separator" categories (except the ASCII space).
      int8_t type = u_charType(static_cast<UChar32>(c));
      bool printable =
          !(type == U_CONTROL_CHAR || type == U_FORMAT_CHAR || type == U_SURROGATE ||
            type == U_PRIVATE_USE_CHAR || type == U_UNASSIGNED || type == U_SPACE_SEPARATOR ||
            type == U_LINE_SEPARATOR || type == U_PARAGRAPH_SEPARATOR);
      if (printable) {
        out->append(s.substr(start, p - start));
      } else if (c <= 0xFF) {
        out->append("\\x");
        AppendHex(c, 2, out);
      } else if (c <= 0xFFFF) {
        out->append("\\u");
        AppendHex(c, 4, out);
      } else {
        out->append("\\U");
        AppendHex(c, 8, out);
      }
    }
  }
  out->push_back(quote);
}

// json.dumps string encoding.
void AppendJsonString(std::string_view s, bool ensure_ascii, std::string* out) {
  out->push_back('"');
  size_t p = 0;
  while (p < s.size()) {
    size_t start = p;
    char32_t c = NextCodePoint(s, &p);
    switch (c) {
      case '"':
        out->append("\\\"");
        break;
      case '\\':
        out->append("\\\\");
        break;
      case '\n':
        out->append("\\n");
        break;
      case '\r':
        out->append("\\r");
        break;
      case '\t':
        out->append("\\t");
        break;
      case '\b':
        out->append("\\b");
        break;
      case '\f':
        out->append("\\f");
        break;
      default:
        if (c < 0x20 || (ensure_ascii && c >= 0x7F)) {
          if (c >= 0x10000) {
            char32_t v = c - 0x10000;
            out->append("\\u");
            AppendHex(0xD800 + (v >> 10), 4, out);
            out->append("\\u");
            AppendHex(0xDC00 + (v & 0x3FF), 4, out);
          } else {
            out->append("\\u");
            AppendHex(c, 4, out);
          }
        } else {
          out->append(s.substr(start, p - start));
        }
    }
  }
  out->push_back('"');
}

bool CheckedAdd(int64_t a, int64_t b, int64_t* r) { return !__builtin_add_overflow(a, b, r); }
bool CheckedSub(int64_t a, int64_t b, int64_t* r) { return !__builtin_sub_overflow(a, b, r); }
bool CheckedMul(int64_t a, int64_t b, int64_t* r) { return !__builtin_mul_overflow(a, b, r); }

// ---------------------------------------------------------------------------------------------
// Values: the Python objects a template can see. Strings, lists and dicts are immutable (the
// transformers environment is jinja2's ImmutableSandboxedEnvironment) and shared by pointer;
// only namespace() objects and the loop object change in place.

struct ListData;
struct DictData;
struct NamespaceData;
struct LoopData;
struct CallableData;

struct Undefined {
  // What jinja2 would say when the undefined value is used: "'foo' is undefined".
  std::shared_ptr<const std::string> hint;
};
struct None {};

using StrPtr = std::shared_ptr<const std::string>;
using ListPtr = std::shared_ptr<const ListData>;
using DictPtr = std::shared_ptr<const DictData>;
using NamespacePtr = std::shared_ptr<NamespaceData>;
using LoopPtr = std::shared_ptr<LoopData>;
using CallablePtr = std::shared_ptr<const CallableData>;

enum class Type : uint8_t {
  kUndefined,
  kNone,
  kBool,
  kInt,
  kFloat,
  kString,
  kList,
  kDict,
  kNamespace,
  kLoop,
  kCallable
};

class Value {
 public:
  Value() : rep_(Undefined{}) {}
  static Value MakeUndefined(std::string hint) {
    return Value(Undefined{std::make_shared<const std::string>(std::move(hint))});
  }
  static Value MakeNone() { return Value(None{}); }
  static Value Bool(bool b) { return Value(b); }
  static Value Int(int64_t i) { return Value(i); }
  static Value Float(double d) { return Value(d); }
  static Value String(std::string s) {
    return Value(std::make_shared<const std::string>(std::move(s)));
  }
  static Value List(std::vector<Value> items, bool is_tuple = false);
  static Value Dict(std::vector<std::pair<Value, Value>> entries);
  static Value Namespace(NamespacePtr ns) { return Value(std::move(ns)); }
  static Value Loop(LoopPtr loop) { return Value(std::move(loop)); }
  static Value Callable(CallablePtr c) { return Value(std::move(c)); }

  Type type() const { return static_cast<Type>(rep_.index()); }
  bool is(Type t) const { return type() == t; }
  bool IsUndefined() const { return type() == Type::kUndefined; }
  // bool is an int subclass in Python; arithmetic and indexing accept it.
  bool IsIntLike() const { return type() == Type::kInt || type() == Type::kBool; }
  bool IsNumber() const { return IsIntLike() || type() == Type::kFloat; }

  bool b() const { return std::get<bool>(rep_); }
  int64_t i() const { return type() == Type::kBool ? (b() ? 1 : 0) : std::get<int64_t>(rep_); }
  double f() const {
    return type() == Type::kFloat ? std::get<double>(rep_) : static_cast<double>(i());
  }
  const std::string& str() const { return *std::get<StrPtr>(rep_); }
  const ListPtr& list_ptr() const { return std::get<ListPtr>(rep_); }
  const ListData& list() const { return *list_ptr(); }
  const DictData& dict() const { return *std::get<DictPtr>(rep_); }
  NamespaceData& ns() const { return *std::get<NamespacePtr>(rep_); }
  const NamespacePtr& ns_ptr() const { return std::get<NamespacePtr>(rep_); }
  LoopData& loop() const { return *std::get<LoopPtr>(rep_); }
  const CallableData& callable() const { return *std::get<CallablePtr>(rep_); }
  const std::string& undefined_hint() const {
    static const std::string kGeneric = "value is undefined";
    const auto& h = std::get<Undefined>(rep_).hint;
    return h ? *h : kGeneric;
  }
  // Nesting depth of lists and dicts (scalars are 0).
  int depth() const;
  // Whether the value holds a namespace or loop object: those are mutable and must not be
  // stored into a namespace, which could make a reference cycle.
  bool HasRef() const;

 private:
  using Rep = std::variant<Undefined, None, bool, int64_t, double, StrPtr, ListPtr, DictPtr,
                           NamespacePtr, LoopPtr, CallablePtr>;
  template <typename T>
  explicit Value(T v) : rep_(std::move(v)) {}
  Rep rep_;
};

struct ListData {
  std::vector<Value> items;
  bool is_tuple = false;
  int depth = 1;
  bool has_ref = false;
};

bool Equal(const Value& a, const Value& b);

struct DictData {
  std::vector<std::pair<Value, Value>> entries;  // insertion order, as Python dicts keep it
  int depth = 1;
  bool has_ref = false;

  const Value* Find(const Value& key) const {
    if (key.is(Type::kString)) {
      for (const auto& [k, v] : entries) {
        if (k.is(Type::kString) && k.str() == key.str()) {
          return &v;
        }
      }
      return nullptr;
    }
    for (const auto& [k, v] : entries) {
      if (Equal(k, key)) {
        return &v;
      }
    }
    return nullptr;
  }
  const Value* Find(std::string_view key) const {
    for (const auto& [k, v] : entries) {
      if (k.is(Type::kString) && k.str() == key) {
        return &v;
      }
    }
    return nullptr;
  }
};

struct NamespaceData {
  std::vector<std::pair<std::string, Value>> attrs;
  Value* Find(std::string_view name) {
    for (auto& [k, v] : attrs) {
      if (k == name) {
        return &v;
      }
    }
    return nullptr;
  }
};

struct LoopData {
  ListPtr items;
  int64_t index0 = 0;
  int64_t length() const { return static_cast<int64_t>(items->items.size()); }
};

struct Node;
struct Scope;

struct CallableData {
  enum class Kind { kGlobal, kMethod, kMacro };
  Kind kind = Kind::kGlobal;
  std::string name;
  Value receiver;                // kMethod: the object the method is bound to
  const Node* macro = nullptr;   // kMacro: the {% macro %} node, owned by the Program
  std::weak_ptr<Scope> closure;  // kMacro: where it was defined (weak: scopes own their values)
};

Value Value::List(std::vector<Value> items, bool is_tuple) {
  auto data = std::make_shared<ListData>();
  int depth = 0;
  for (const auto& v : items) {
    depth = std::max(depth, v.depth());
    data->has_ref = data->has_ref || v.HasRef();
  }
  data->items = std::move(items);
  data->is_tuple = is_tuple;
  data->depth = depth + 1;
  return Value(ListPtr(std::move(data)));
}

Value Value::Dict(std::vector<std::pair<Value, Value>> entries) {
  auto data = std::make_shared<DictData>();
  int depth = 0;
  for (const auto& [k, v] : entries) {
    depth = std::max({depth, k.depth(), v.depth()});
    data->has_ref = data->has_ref || v.HasRef();
  }
  data->entries = std::move(entries);
  data->depth = depth + 1;
  return Value(DictPtr(std::move(data)));
}

int Value::depth() const {
  switch (type()) {
    case Type::kList:
      return list().depth;
    case Type::kDict:
      return dict().depth;
    case Type::kLoop:
      return loop().items->depth + 1;
    case Type::kCallable:
      return callable().receiver.depth() + 1;
    default:
      return 0;
  }
}

bool Value::HasRef() const {
  switch (type()) {
    case Type::kNamespace:
    case Type::kLoop:
      return true;
    case Type::kList:
      return list().has_ref;
    case Type::kDict:
      return dict().has_ref;
    case Type::kCallable:
      return callable().receiver.HasRef();
    default:
      return false;
  }
}

std::string TypeName(const Value& v) {
  switch (v.type()) {
    case Type::kUndefined:
      return "Undefined";
    case Type::kNone:
      return "NoneType";
    case Type::kBool:
      return "bool";
    case Type::kInt:
      return "int";
    case Type::kFloat:
      return "float";
    case Type::kString:
      return "str";
    case Type::kList:
      return v.list().is_tuple ? "tuple" : "list";
    case Type::kDict:
      return "dict";
    case Type::kNamespace:
      return "Namespace";
    case Type::kLoop:
      return "LoopContext";
    case Type::kCallable:
      return v.callable().kind == CallableData::Kind::kMacro ? "Macro"
                                                             : "builtin_function_or_method";
  }
  return "object";
}

bool Truthy(const Value& v) {
  switch (v.type()) {
    case Type::kUndefined:
    case Type::kNone:
      return false;
    case Type::kBool:
      return v.b();
    case Type::kInt:
      return v.i() != 0;
    case Type::kFloat:
      return v.f() != 0;
    case Type::kString:
      return !v.str().empty();
    case Type::kList:
      return !v.list().items.empty();
    case Type::kDict:
      return !v.dict().entries.empty();
    default:
      return true;
  }
}

bool Equal(const Value& a, const Value& b) {
  if (a.IsNumber() && b.IsNumber()) {
    if (a.IsIntLike() && b.IsIntLike()) {
      return a.i() == b.i();
    }
    return a.f() == b.f();
  }
  if (a.type() != b.type()) {
    return false;
  }
  switch (a.type()) {
    case Type::kUndefined:
    case Type::kNone:
      return true;
    case Type::kString:
      return a.str() == b.str();
    case Type::kList: {
      const auto& x = a.list();
      const auto& y = b.list();
      if (x.is_tuple != y.is_tuple || x.items.size() != y.items.size()) {
        return false;
      }
      for (size_t k = 0; k < x.items.size(); ++k) {
        if (!Equal(x.items[k], y.items[k])) {
          return false;
        }
      }
      return true;
    }
    case Type::kDict: {
      const auto& x = a.dict();
      const auto& y = b.dict();
      if (x.entries.size() != y.entries.size()) {
        return false;
      }
      for (const auto& [k, v] : x.entries) {
        const Value* other = y.Find(k);
        if (other == nullptr || !Equal(v, *other)) {
          return false;
        }
      }
      return true;
    }
    case Type::kNamespace:
      return a.ns_ptr() == b.ns_ptr();
    case Type::kLoop:
      return &a.loop() == &b.loop();
    case Type::kCallable:
      return &a.callable() == &b.callable();
    default:
      return false;
  }
}

bool IsHashable(const Value& v) {
  if (v.is(Type::kList)) {
    if (!v.list().is_tuple) {
      return false;
    }
    for (const auto& item : v.list().items) {
      if (!IsHashable(item)) {
        return false;
      }
    }
    return true;
  }
  return !v.is(Type::kDict) && !v.is(Type::kNamespace);
}

// Writers for str(), repr() and json.dumps(). They stop with RESOURCE_EXHAUSTED once the text
// passes kMaxStringBytes: a list holding the same large string many times is small in memory
// but not in print.
absl::Status TooLarge() {
  return absl::ResourceExhaustedError(
      absl::StrCat("chat template produced a value over ", kMaxStringBytes, " bytes"));
}

absl::Status AppendRepr(const Value& v, std::string* out);

absl::Status AppendStr(const Value& v, std::string* out) {
  switch (v.type()) {
    case Type::kUndefined:
      return absl::OkStatus();
    case Type::kNone:
      out->append("None");
      return absl::OkStatus();
    case Type::kBool:
      out->append(v.b() ? "True" : "False");
      return absl::OkStatus();
    case Type::kInt:
      out->append(std::to_string(v.i()));
      return absl::OkStatus();
    case Type::kFloat:
      out->append(FormatFloat(v.f()));
      return absl::OkStatus();
    case Type::kString:
      out->append(v.str());
      break;
    default:
      return AppendRepr(v, out);
  }
  return out->size() > kMaxStringBytes ? TooLarge() : absl::OkStatus();
}

absl::Status AppendRepr(const Value& v, std::string* out) {
  switch (v.type()) {
    case Type::kString:
      AppendStringRepr(v.str(), out);
      break;
    case Type::kList: {
      const auto& l = v.list();
      out->push_back(l.is_tuple ? '(' : '[');
      for (size_t k = 0; k < l.items.size(); ++k) {
        if (k > 0) {
          out->append(", ");
        }
        CT_RETURN_IF_ERROR(AppendRepr(l.items[k], out));
      }
      if (l.is_tuple && l.items.size() == 1) {
        out->push_back(',');
      }
      out->push_back(l.is_tuple ? ')' : ']');
      break;
    }
    case Type::kDict: {
      out->push_back('{');
      bool first = true;
      for (const auto& [k, val] : v.dict().entries) {
        if (!first) {
          out->append(", ");
        }
        first = false;
        CT_RETURN_IF_ERROR(AppendRepr(k, out));
        out->append(": ");
        CT_RETURN_IF_ERROR(AppendRepr(val, out));
      }
      out->push_back('}');
      break;
    }
    case Type::kNamespace: {
      out->append("<Namespace {");
      bool first = true;
      for (const auto& [k, val] : v.ns().attrs) {
        if (!first) {
          out->append(", ");
        }
        first = false;
        AppendStringRepr(k, out);
        out->append(": ");
        CT_RETURN_IF_ERROR(AppendRepr(val, out));
      }
      out->append("}>");
      break;
    }
    case Type::kLoop:
      out->append("<LoopContext ");
      out->append(std::to_string(v.loop().index0 + 1));
      out->append("/");
      out->append(std::to_string(v.loop().length()));
      out->append(">");
      break;
    case Type::kCallable: {
      const auto& c = v.callable();
      if (c.kind == CallableData::Kind::kMacro) {
        out->append("<Macro '" + c.name + "'>");
      } else {
        out->append("<built-in method " + c.name + ">");
      }
      break;
    }
    case Type::kUndefined:
      out->append("Undefined");  // repr() of jinja2's Undefined, e.g. inside a printed list
      break;
    default:
      return AppendStr(v, out);
  }
  return out->size() > kMaxStringBytes ? TooLarge() : absl::OkStatus();
}

struct JsonOptions {
  bool ensure_ascii = false;
  std::optional<std::string> indent;  // json.dumps(indent=...): newline + indent per level
  std::string item_separator = ", ";
  std::string key_separator = ": ";
  bool sort_keys = false;
};

absl::Status AppendJson(const Value& v, const JsonOptions& opt, int level, std::string* out) {
  auto newline = [&](int lvl) {
    out->push_back('\n');
    for (int k = 0; k < lvl; ++k) {
      out->append(*opt.indent);
    }
  };
  switch (v.type()) {
    case Type::kNone:
      out->append("null");
      break;
    case Type::kBool:
      out->append(v.b() ? "true" : "false");
      break;
    case Type::kInt:
      out->append(std::to_string(v.i()));
      break;
    case Type::kFloat: {
      double d = v.f();
      out->append(std::isnan(d)   ? "NaN"
                  : std::isinf(d) ? (d < 0 ? "-Infinity" : "Infinity")
                                  : FormatFloat(d));
      break;
    }
    case Type::kString:
      AppendJsonString(v.str(), opt.ensure_ascii, out);
      break;
    case Type::kList: {
      const auto& items = v.list().items;
      if (items.empty()) {
        out->append("[]");
        break;
      }
      out->push_back('[');
      for (size_t k = 0; k < items.size(); ++k) {
        if (k > 0) {
          out->append(opt.item_separator);
        }
        if (opt.indent) {
          newline(level + 1);
        }
        CT_RETURN_IF_ERROR(AppendJson(items[k], opt, level + 1, out));
      }
      if (opt.indent) {
        newline(level);
      }
      out->push_back(']');
      break;
    }
    case Type::kDict: {
      const auto& entries = v.dict().entries;
      if (entries.empty()) {
        out->append("{}");
        break;
      }
      // json.dumps turns scalar keys into strings and refuses other keys.
      std::vector<std::pair<std::string, const Value*>> keyed;
      keyed.reserve(entries.size());
      for (const auto& [k, val] : entries) {
        std::string key;
        switch (k.type()) {
          case Type::kString:
            key = k.str();
            break;
          case Type::kNone:
            key = "null";
            break;
          case Type::kBool:
            key = k.b() ? "true" : "false";
            break;
          case Type::kInt:
          case Type::kFloat:
            CT_RETURN_IF_ERROR(AppendJson(k, opt, level, &key));
            break;
          default:
            return absl::InvalidArgumentError(absl::StrCat(
                "tojson: keys must be str, int, float, bool or None, not ", TypeName(k)));
        }
        keyed.emplace_back(std::move(key), &val);
      }
      if (opt.sort_keys) {
        std::stable_sort(keyed.begin(), keyed.end(),
                         [](const auto& a, const auto& b) { return a.first < b.first; });
      }
      out->push_back('{');
      for (size_t k = 0; k < keyed.size(); ++k) {
        if (k > 0) {
          out->append(opt.item_separator);
        }
        if (opt.indent) {
          newline(level + 1);
        }
        AppendJsonString(keyed[k].first, opt.ensure_ascii, out);
        out->append(opt.key_separator);
        CT_RETURN_IF_ERROR(AppendJson(*keyed[k].second, opt, level + 1, out));
      }
      if (opt.indent) {
        newline(level);
      }
      out->push_back('}');
      break;
    }
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("tojson: object of type ", TypeName(v), " is not JSON serializable"));
  }
  return out->size() > kMaxStringBytes ? TooLarge() : absl::OkStatus();
}

// Converts the caller's JSON into values. Recursion is bounded by kMaxValueDepth.
template <typename Json>
absl::StatusOr<Value> FromJson(const Json& j, int depth) {
  if (depth > kMaxValueDepth) {
    return absl::InvalidArgumentError("chat template context is nested too deeply");
  }
  switch (j.type()) {
    case Json::value_t::null:
      return Value::MakeNone();
    case Json::value_t::boolean:
      return Value::Bool(j.template get<bool>());
    case Json::value_t::number_integer:
      return Value::Int(j.template get<int64_t>());
    case Json::value_t::number_unsigned: {
      uint64_t u = j.template get<uint64_t>();
      if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return Value::Float(static_cast<double>(u));
      }
      return Value::Int(static_cast<int64_t>(u));
    }
    case Json::value_t::number_float:
      return Value::Float(j.template get<double>());
    case Json::value_t::string:
      return Value::String(j.template get_ref<const std::string&>());
    case Json::value_t::array: {
      std::vector<Value> items;
      items.reserve(j.size());
      for (const auto& e : j) {
        CT_ASSIGN_OR_RETURN(Value v, FromJson(e, depth + 1));
        items.push_back(std::move(v));
      }
      return Value::List(std::move(items));
    }
    case Json::value_t::object: {
      std::vector<std::pair<Value, Value>> entries;
      entries.reserve(j.size());
      for (auto it = j.begin(); it != j.end(); ++it) {
        CT_ASSIGN_OR_RETURN(Value v, FromJson(it.value(), depth + 1));
        entries.emplace_back(Value::String(it.key()), std::move(v));
      }
      return Value::Dict(std::move(entries));
    }
    default:
      return absl::InvalidArgumentError("chat template context holds a binary or discarded value");
  }
}

// ---------------------------------------------------------------------------------------------
// Lexer. Reproduces jinja2's lexer with trim_blocks and lstrip_blocks: "{%-"/"-%}" strip all
// whitespace on that side, "{%+"/"+%}" turn lstrip/trim off for one tag, a block or comment tag
// alone on its line loses the indentation before it and the newline after it.

enum class Tok : uint8_t {
  kData,
  kVarBegin,
  kVarEnd,
  kBlockBegin,
  kBlockEnd,
  kName,
  kString,
  kInt,
  kFloat,
  kOp,
  kEof
};

struct Token {
  Tok type;
  std::string text;  // data, name, operator, or the decoded string literal
  int64_t int_value = 0;
  double float_value = 0;
  size_t pos = 0;  // byte offset in the normalised source
};

class SourceMap {
 public:
  explicit SourceMap(std::string_view src) : src_(src) {
    line_starts_.push_back(0);
    for (size_t k = 0; k < src.size(); ++k) {
      if (src[k] == '\n') {
        line_starts_.push_back(k + 1);
      }
    }
  }
  std::pair<int, int> LineColumn(size_t pos) const {
    pos = std::min(pos, src_.size());
    auto it = std::upper_bound(line_starts_.begin(), line_starts_.end(), pos);
    size_t line = static_cast<size_t>(it - line_starts_.begin());
    size_t start = line_starts_[line - 1];
    return {static_cast<int>(line),
            static_cast<int>(CodePointCount(src_.substr(start, pos - start))) + 1};
  }
  absl::Status Error(size_t pos, std::string_view msg) const {
    auto [line, col] = LineColumn(pos);
    return absl::InvalidArgumentError(
        absl::StrCat("line ", line, ", column ", col, ": ", std::string(msg)));
  }

 private:
  std::string_view src_;
  std::vector<size_t> line_starts_;
};

bool StartsAt(std::string_view s, size_t pos, std::string_view what) {
  return pos <= s.size() && s.substr(pos, what.size()) == what;
}

size_t SkipPySpace(std::string_view s, size_t pos) {
  while (pos < s.size()) {
    size_t p = pos;
    if (!IsPySpace(NextCodePoint(s, &p))) {
      break;
    }
    pos = p;
  }
  return pos;
}

bool IsDigit(char c) { return c >= '0' && c <= '9'; }
bool IsNameStart(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }
bool IsNameChar(char c) { return IsNameStart(c) || IsDigit(c); }

std::string Quote(std::string_view s) { return absl::StrCat("'", std::string(s), "'"); }

class Lexer {
 public:
  Lexer(std::string_view src, const SourceMap& map) : src_(src), map_(map) {}

  absl::Status Run(std::vector<Token>* out) {
    out_ = out;
    size_t pos = 0;
    bool line_starting = true;
    while (pos < src_.size()) {
      size_t idx = FindTagStart(pos);
      if (idx == std::string_view::npos) {
        Emit(Tok::kData, std::string(src_.substr(pos)), pos);
        break;
      }
      const char kind = src_[idx + 1];
      size_t after = idx + 2;
      char sign = 0;
      if (after < src_.size() && (src_[after] == '-' || src_[after] == '+')) {
        sign = src_[after++];
      }
      std::string_view text = src_.substr(pos, idx - pos);
      size_t raw_body = 0;
      const bool raw = kind == '%' && MatchRawBegin(after, &raw_body);
      if (sign == '-') {
        text = PyStrip(text, false, true, std::nullopt);
      } else if (sign != '+' && kind != '{') {
        size_t l_pos = text.rfind('\n') + 1;  // npos + 1 == 0
        if ((l_pos > 0 || line_starting) && AllPySpace(text.substr(l_pos))) {
          text = text.substr(0, l_pos);
        }
      }
      if (!text.empty()) {
        Emit(Tok::kData, std::string(text), pos);
      }
      if (raw) {
        CT_RETURN_IF_ERROR(LexRaw(idx, raw_body, &pos));
      } else if (kind == '#') {
        CT_RETURN_IF_ERROR(LexComment(idx, after, &pos));
      } else {
        CT_RETURN_IF_ERROR(LexTag(idx, after, kind == '%', &pos));
      }
      line_starting = pos > 0 && src_[pos - 1] == '\n';
    }
    Emit(Tok::kEof, "", src_.size());
    return absl::OkStatus();
  }

 private:
  void Emit(Tok type, std::string text, size_t pos) {
    Token t;
    t.type = type;
    t.text = std::move(text);
    t.pos = pos;
    out_->push_back(std::move(t));
  }

  size_t FindTagStart(size_t pos) const {
    while (true) {
      size_t idx = src_.find('{', pos);
      if (idx == std::string_view::npos || idx + 1 >= src_.size()) {
        return std::string_view::npos;
      }
      char c = src_[idx + 1];
      if (c == '{' || c == '%' || c == '#') {
        return idx;
      }
      pos = idx + 1;
    }
  }

  // "{% raw %}" (any whitespace control); on success *body is where the raw text starts.
  bool MatchRawBegin(size_t after, size_t* body) const {
    size_t p = SkipPySpace(src_, after);
    if (!StartsAt(src_, p, "raw")) {
      return false;
    }
    p = SkipPySpace(src_, p + 3);
    if (StartsAt(src_, p, "-%}")) {
      *body = SkipPySpace(src_, p + 3);
      return true;
    }
    if (StartsAt(src_, p, "%}")) {
      *body = p + 2;
      return true;
    }
    return false;
  }

  absl::Status LexRaw(size_t tag_pos, size_t body, size_t* pos) {
    for (size_t q = src_.find("{%", body); q != std::string_view::npos;
         q = src_.find("{%", q + 1)) {
      size_t p = q + 2;
      char sign = 0;
      if (p < src_.size() && (src_[p] == '-' || src_[p] == '+')) {
        sign = src_[p++];
      }
      p = SkipPySpace(src_, p);
      if (!StartsAt(src_, p, "endraw")) {
        continue;
      }
      p = SkipPySpace(src_, p + 6);
      size_t end;
      if (StartsAt(src_, p, "+%}")) {
        end = p + 3;
      } else if (StartsAt(src_, p, "-%}")) {
        end = SkipPySpace(src_, p + 3);
      } else if (StartsAt(src_, p, "%}")) {
        end = p + 2;
        if (end < src_.size() && src_[end] == '\n') {
          ++end;
        }
      } else {
        continue;
      }
      std::string_view text = src_.substr(body, q - body);
      if (sign == '-') {
        text = PyStrip(text, false, true, std::nullopt);
      } else if (sign != '+') {
        size_t l_pos = text.rfind('\n') + 1;
        if (l_pos > 0 && AllPySpace(text.substr(l_pos))) {
          text = text.substr(0, l_pos);
        }
      }
      if (!text.empty()) {
        Emit(Tok::kData, std::string(text), body);
      }
      *pos = end;
      return absl::OkStatus();
    }
    return map_.Error(tag_pos, "missing end of raw directive ('{% endraw %}')");
  }

  absl::Status LexComment(size_t tag_pos, size_t after, size_t* pos) {
    for (size_t q = after; q < src_.size(); ++q) {
      if ((src_[q] == '+' || src_[q] == '-') && StartsAt(src_, q + 1, "#}")) {
        *pos = src_[q] == '-' ? SkipPySpace(src_, q + 3) : q + 3;
        return absl::OkStatus();
      }
      if (StartsAt(src_, q, "#}")) {
        *pos = q + 2;
        if (*pos < src_.size() && src_[*pos] == '\n') {
          ++*pos;
        }
        return absl::OkStatus();
      }
    }
    return map_.Error(tag_pos, "missing end of comment tag ('#}')");
  }

  absl::Status LexTag(size_t tag_pos, size_t p, bool block, size_t* pos) {
    Emit(block ? Tok::kBlockBegin : Tok::kVarBegin, "", tag_pos);
    std::vector<char> brackets;  // end delimiters only count outside brackets, as in jinja2
    while (true) {
      p = SkipPySpace(src_, p);
      if (p >= src_.size()) {
        return map_.Error(tag_pos, block ? "unexpected end of template: '%}' expected"
                                         : "unexpected end of template: '}}' expected");
      }
      if (brackets.empty()) {
        if (block) {
          if (StartsAt(src_, p, "-%}")) {
            Emit(Tok::kBlockEnd, "", p);
            *pos = SkipPySpace(src_, p + 3);
            return absl::OkStatus();
          }
          if (StartsAt(src_, p, "+%}")) {
            Emit(Tok::kBlockEnd, "", p);
            *pos = p + 3;
            return absl::OkStatus();
          }
          if (StartsAt(src_, p, "%}")) {
            Emit(Tok::kBlockEnd, "", p);
            *pos = p + 2;
            if (*pos < src_.size() && src_[*pos] == '\n') {
              ++*pos;
            }
            return absl::OkStatus();
          }
        } else {
          if (StartsAt(src_, p, "-}}")) {
            Emit(Tok::kVarEnd, "", p);
            *pos = SkipPySpace(src_, p + 3);
            return absl::OkStatus();
          }
          if (StartsAt(src_, p, "}}")) {
            Emit(Tok::kVarEnd, "", p);
            *pos = p + 2;
            return absl::OkStatus();
          }
        }
      }
      const char c = src_[p];
      if (IsDigit(c)) {
        CT_RETURN_IF_ERROR(LexNumber(&p));
      } else if (IsNameStart(c)) {
        size_t start = p;
        while (p < src_.size() && IsNameChar(src_[p])) {
          ++p;
        }
        Emit(Tok::kName, std::string(src_.substr(start, p - start)), start);
      } else if (c == '\'' || c == '"') {
        CT_RETURN_IF_ERROR(LexString(&p));
      } else {
        static constexpr std::string_view kOps[] = {
            "//", "**", "==", "!=", "<=", ">=", "+", "-", "/", "*", "%", "~", "[",
            "]",  "(",  ")",  "{",  "}",  "<",  ">", "=", ".", ":", "|", ",", ";"};
        std::string_view op;
        for (std::string_view candidate : kOps) {
          if (StartsAt(src_, p, candidate)) {
            op = candidate;
            break;
          }
        }
        if (op.empty()) {
          size_t q = p;
          char32_t bad = NextCodePoint(src_, &q);
          return map_.Error(p, absl::StrCat("unexpected char ", Quote(CodePointToString(bad))));
        }
        if (op == "(" || op == "[" || op == "{") {
          brackets.push_back(op[0] == '(' ? ')' : op[0] == '[' ? ']' : '}');
        } else if (op == ")" || op == "]" || op == "}") {
          if (brackets.empty()) {
            return map_.Error(p, absl::StrCat("unexpected ", Quote(op)));
          }
          if (brackets.back() != op[0]) {
            return map_.Error(p, absl::StrCat("unexpected ", Quote(op), ", expected ",
                                              Quote(std::string(1, brackets.back()))));
          }
          brackets.pop_back();
        }
        Emit(Tok::kOp, std::string(op), p);
        p += op.size();
      }
    }
  }

  // Digits with optional "_" separators between them.
  size_t ScanDigits(size_t p, bool (*digit)(char)) const {
    size_t q = p;
    while (q < src_.size() && digit(src_[q])) {
      ++q;
      if (q + 1 < src_.size() && src_[q] == '_' && digit(src_[q + 1])) {
        ++q;
      }
    }
    return q;
  }

  absl::Status LexNumber(size_t* pos) {
    const size_t start = *pos;
    Token t;
    t.pos = start;
    const char prefix = start + 1 < src_.size() ? src_[start + 1] : '\0';
    if (src_[start] == '0' && (prefix == 'x' || prefix == 'X' || prefix == 'o' || prefix == 'O' ||
                               prefix == 'b' || prefix == 'B')) {
      const int base = (prefix == 'x' || prefix == 'X')   ? 16
                       : (prefix == 'o' || prefix == 'O') ? 8
                                                          : 2;
      size_t q = start + 2;
      std::string digits;
      while (q < src_.size() &&
             (std::isalnum(static_cast<unsigned char>(src_[q])) || src_[q] == '_')) {
        if (src_[q] != '_') {
          digits.push_back(src_[q]);
        }
        ++q;
      }
      auto res = std::from_chars(digits.data(), digits.data() + digits.size(), t.int_value, base);
      if (digits.empty() || res.ec != std::errc() || res.ptr != digits.data() + digits.size()) {
        return map_.Error(start, "invalid or too large integer literal");
      }
      t.type = Tok::kInt;
      out_->push_back(std::move(t));
      *pos = q;
      return absl::OkStatus();
    }
    auto dec = [](char c) { return IsDigit(c); };
    size_t p = ScanDigits(start, dec);
    bool is_float = false;
    // jinja2's float rule does not apply right after a dot ("x.0.1" is two subscripts).
    if (start == 0 || src_[start - 1] != '.') {
      size_t q = p;
      if (q + 1 < src_.size() && src_[q] == '.' && IsDigit(src_[q + 1])) {
        q = ScanDigits(q + 1, dec);
        is_float = true;
      }
      if (q < src_.size() && (src_[q] == 'e' || src_[q] == 'E')) {
        size_t r = q + 1;
        if (r < src_.size() && (src_[r] == '+' || src_[r] == '-')) {
          ++r;
        }
        if (r < src_.size() && IsDigit(src_[r])) {
          q = ScanDigits(r, dec);
          is_float = true;
        }
      }
      if (is_float) {
        p = q;
      }
    }
    std::string text;
    for (char c : src_.substr(start, p - start)) {
      if (c != '_') {
        text.push_back(c);
      }
    }
    if (is_float) {
      t.type = Tok::kFloat;
      std::from_chars(text.data(), text.data() + text.size(), t.float_value);
    } else {
      if (text.size() > 1 && text[0] == '0' && text.find_first_not_of('0') != std::string::npos) {
        // jinja2 lexes "012" as "0" followed by "12"; no valid template has that.
        return map_.Error(start, "leading zeros in decimal integer literals are not permitted");
      }
      auto res = std::from_chars(text.data(), text.data() + text.size(), t.int_value);
      if (res.ec != std::errc() || res.ptr != text.data() + text.size()) {
        return map_.Error(start,
                          absl::StrCat("invalid or too large integer literal ", Quote(text)));
      }
      t.type = Tok::kInt;
    }
    t.text = std::move(text);
    out_->push_back(std::move(t));
    *pos = p;
    return absl::OkStatus();
  }

  // A Python string literal with its escapes decoded.
  absl::Status LexString(size_t* pos) {
    const size_t start = *pos;
    const char quote = src_[start];
    std::string value;
    size_t p = start + 1;
    while (true) {
      if (p >= src_.size()) {
        return map_.Error(start, "unterminated string literal");
      }
      char c = src_[p];
      if (c == quote) {
        ++p;
        break;
      }
      if (c != '\\') {
        value.push_back(c);
        ++p;
        continue;
      }
      if (p + 1 >= src_.size()) {
        return map_.Error(start, "unterminated string literal");
      }
      char e = src_[p + 1];
      p += 2;
      auto hex = [&](int n) -> std::optional<char32_t> {
        if (p + static_cast<size_t>(n) > src_.size()) {
          return std::nullopt;
        }
        uint32_t v = 0;
        for (int k = 0; k < n; ++k) {
          char h = src_[p + static_cast<size_t>(k)];
          if (!std::isxdigit(static_cast<unsigned char>(h))) {
            return std::nullopt;
          }
          v = v * 16 + static_cast<uint32_t>(IsDigit(h) ? h - '0' : (std::tolower(h) - 'a' + 10));
        }
        p += static_cast<size_t>(n);
        return static_cast<char32_t>(v);
      };
      switch (e) {
        case '\n':
          break;  // line continuation
        case '\\':
        case '\'':
        case '"':
          value.push_back(e);
          break;
        case 'a':
          value.push_back('\a');
          break;
        case 'b':
          value.push_back('\b');
          break;
        case 'f':
          value.push_back('\f');
          break;
        case 'n':
          value.push_back('\n');
          break;
        case 'r':
          value.push_back('\r');
          break;
        case 't':
          value.push_back('\t');
          break;
        case 'v':
          value.push_back('\v');
          break;
        case 'x':
        case 'u':
        case 'U': {
          auto cp = hex(e == 'x' ? 2 : e == 'u' ? 4 : 8);
          if (!cp || *cp > 0x10FFFF) {
            return map_.Error(p, absl::StrCat("invalid \\", std::string(1, e), " escape"));
          }
          AppendUtf8(*cp, &value);
          break;
        }
        default:
          if (e >= '0' && e <= '7') {
            uint32_t v = static_cast<uint32_t>(e - '0');
            for (int k = 0; k < 2 && p < src_.size() && src_[p] >= '0' && src_[p] <= '7'; ++k) {
              v = v * 8 + static_cast<uint32_t>(src_[p++] - '0');
            }
            AppendUtf8(v, &value);
          } else if (e == 'N') {
            return map_.Error(p, "unsupported construct: \\N{...} escapes in string literals");
          } else {
            value.push_back('\\');  // Python keeps unknown escapes as written
            value.push_back(e);
          }
      }
    }
    Token t;
    t.type = Tok::kString;
    t.text = std::move(value);
    t.pos = start;
    out_->push_back(std::move(t));
    *pos = p;
    return absl::OkStatus();
  }

  std::string_view src_;
  const SourceMap& map_;
  std::vector<Token>* out_ = nullptr;
};

// ---------------------------------------------------------------------------------------------
// The parsed tree.

enum class ExprKind : uint8_t {
  kLiteral,
  kName,
  kList,
  kTuple,
  kDict,  // args alternate key, value
  kNeg,
  kPos,
  kNot,
  kAnd,
  kOr,
  kCond,       // args: test, then, else (may be null)
  kBinary,     // name: the operator
  kConcat,     // "~" of all args
  kCompare,    // args[0] op[0] args[1] op[1] args[2] ...
  kGetAttr,    // args[0].name
  kGetItem,    // args[0][args[1]]
  kSlice,      // args: start, stop, step (each may be null); only inside kGetItem
  kCall,       // args[0](args[1:], kwargs)
  kFilter,     // args[0] | name(args[1:], kwargs)
  kTest,       // args[0] is [not] name(args[1:], kwargs)
  kBlockValue  // the rendered body of a {% filter %} or {% set x | f %} block
};

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

struct Expr {
  ExprKind kind;
  int line = 0;
  int column = 0;
  int depth = 1;
  bool negated = false;  // kTest: "is not"
  std::string name;
  Value literal;
  std::vector<ExprPtr> args;
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
  std::vector<std::string> ops;
};

enum class NodeKind : uint8_t {
  kText,
  kOutput,
  kIf,
  kFor,
  kSet,
  kSetAttr,  // {% set ns.attr = ... %}
  kSetBlock,
  kBreak,
  kContinue,
  kMacro,
  kWith,
  kFilterBlock,
  kScope  // a transparent block ({% generation %})
};

using NodePtr = std::unique_ptr<Node>;

struct Node {
  NodeKind kind;
  int line = 0;
  int column = 0;
  std::string text;                  // kText: the text; kMacro: the name; kSetAttr: attribute
  ExprPtr expr;                      // kOutput/kSet/kSetAttr: value; kFor: iterable
  ExprPtr cond;                      // kFor: the "if" filter; kSetBlock/kFilterBlock: filters
  std::vector<std::string> targets;  // kFor/kSet/kSetBlock: names; kSetAttr: the namespace
  std::vector<std::pair<ExprPtr, std::vector<NodePtr>>> branches;  // kIf: (test, body)
  std::vector<NodePtr> body;
  std::vector<NodePtr> else_body;
  // kMacro: parameters and defaults; kWith: assignments.
  std::vector<std::pair<std::string, ExprPtr>> params;
  bool catch_varargs = false;  // kMacro: the body uses `varargs`
  bool catch_kwargs = false;   // kMacro: the body uses `kwargs`
};

}  // namespace

struct Program {
  std::string source;  // normalised: "\n" newlines, one trailing newline removed
  std::vector<NodePtr> body;
};

namespace {

// ---------------------------------------------------------------------------------------------
// Parser: jinja2's grammar and operator precedence, producing the tree above.

constexpr std::string_view kFilters[] = {
    "abs",     "attr",   "capitalize", "count",  "d",          "default", "e",          "escape",
    "first",   "float",  "indent",     "int",    "items",      "join",    "last",       "length",
    "list",    "lower",  "map",        "max",    "min",        "reject",  "rejectattr", "replace",
    "reverse", "round",  "safe",       "select", "selectattr", "sort",    "string",     "sum",
    "title",   "tojson", "trim",       "unique", "upper"};
// jinja2 built-ins this renderer does not implement: named as unsupported rather than unknown.
constexpr std::string_view kUnsupportedFilters[] = {
    "batch",     "center", "dictsort",  "filesizeformat", "forceescape", "format",
    "groupby",   "pprint", "random",    "slice",          "striptags",   "truncate",
    "urlencode", "urlize", "wordcount", "wordwrap",       "xmlattr"};
constexpr std::string_view kTests[] = {
    "boolean", "callable", "defined",   "divisibleby", "eq",          "equalto",
    "even",    "false",    "float",     "ge",          "gt",          "in",
    "integer", "iterable", "le",        "lower",       "lt",          "mapping",
    "ne",      "none",     "number",    "odd",         "sameas",      "sequence",
    "string",  "true",     "undefined", "upper",       "==",          "!=",
    "<",       "<=",       ">",         ">=",          "greaterthan", "lessthan"};
constexpr std::string_view kUnsupportedTests[] = {"escaped", "filter", "test"};
// Tags of jinja2 (and its stock extensions) that chat templates do not need.
constexpr std::string_view kUnsupportedTags[] = {"include",   "import", "from",       "extends",
                                                 "block",     "call",   "autoescape", "trans",
                                                 "pluralize", "do",     "print",      "debug"};

bool Contains(const std::string_view* begin, const std::string_view* end, std::string_view s) {
  return std::find(begin, end, s) != end;
}
template <size_t N>
bool Contains(const std::string_view (&list)[N], std::string_view s) {
  return Contains(list, list + N, s);
}

class Parser {
 public:
  Parser(const std::vector<Token>& toks, const SourceMap& map) : toks_(toks), map_(map) {}

  absl::Status ParseTemplate(std::vector<NodePtr>* body) {
    std::string end_tag;
    CT_RETURN_IF_ERROR(ParseBody({}, body, &end_tag));
    return absl::OkStatus();
  }

 private:
  const Token& Cur() const { return toks_[i_]; }
  const Token& Peek(size_t k = 1) const { return toks_[std::min(i_ + k, toks_.size() - 1)]; }
  void Next() {
    if (i_ + 1 < toks_.size()) {
      ++i_;
    }
  }
  bool IsOp(std::string_view op) const { return Cur().type == Tok::kOp && Cur().text == op; }
  bool IsName(std::string_view name) const {
    return Cur().type == Tok::kName && Cur().text == name;
  }

  static std::string Describe(const Token& t) {
    switch (t.type) {
      case Tok::kData:
        return "template data";
      case Tok::kVarBegin:
        return "'{{'";
      case Tok::kVarEnd:
        return "end of print statement";
      case Tok::kBlockBegin:
        return "'{%'";
      case Tok::kBlockEnd:
        return "end of statement block";
      case Tok::kEof:
        return "end of template";
      case Tok::kString:
        return "string literal";
      default:
        return Quote(t.text);
    }
  }

  absl::Status Fail(const Token& t, std::string_view msg) const { return map_.Error(t.pos, msg); }
  absl::Status Unexpected(std::string_view expected) const {
    return Fail(Cur(), absl::StrCat("expected ", std::string(expected), ", got ", Describe(Cur())));
  }
  absl::Status ExpectOp(std::string_view op) {
    if (!IsOp(op)) {
      return Unexpected(Quote(op));
    }
    Next();
    return absl::OkStatus();
  }
  absl::Status ExpectBlockEnd() {
    if (Cur().type != Tok::kBlockEnd) {
      return Unexpected("end of statement block");
    }
    Next();
    return absl::OkStatus();
  }
  absl::StatusOr<std::string> ExpectName() {
    if (Cur().type != Tok::kName) {
      return Unexpected("a name");
    }
    std::string name = Cur().text;
    Next();
    return name;
  }

  ExprPtr MakeExpr(ExprKind kind, const Token& at) const {
    auto e = std::make_unique<Expr>();
    e->kind = kind;
    auto [line, col] = map_.LineColumn(at.pos);
    e->line = line;
    e->column = col;
    return e;
  }
  // Records the depth of `e` from its children: the evaluator recurses over expressions, so a
  // 100000-term sum must be refused here rather than overflow the stack there.
  absl::StatusOr<ExprPtr> Done(ExprPtr e) const {
    int depth = 0;
    for (const auto& a : e->args) {
      if (a) {
        depth = std::max(depth, a->depth);
      }
    }
    for (const auto& [k, a] : e->kwargs) {
      depth = std::max(depth, a->depth);
    }
    e->depth = depth + 1;
    if (e->depth > kMaxExprDepth) {
      return absl::InvalidArgumentError(
          absl::StrCat("line ", e->line, ", column ", e->column, ": expression nested too deeply"));
    }
    return e;
  }

  NodePtr MakeNode(NodeKind kind, const Token& at) const {
    auto n = std::make_unique<Node>();
    n->kind = kind;
    auto [line, col] = map_.LineColumn(at.pos);
    n->line = line;
    n->column = col;
    return n;
  }

  // RAII guard on the parser's own recursion.
  class DepthGuard {
   public:
    explicit DepthGuard(int* depth) : depth_(depth) { ++*depth_; }
    ~DepthGuard() { --*depth_; }
    DepthGuard(const DepthGuard&) = delete;
    DepthGuard& operator=(const DepthGuard&) = delete;

   private:
    int* depth_;
  };
  absl::Status CheckDepth() const {
    if (depth_ > kMaxParseDepth) {
      return Fail(Cur(), "template nested too deeply");
    }
    return absl::OkStatus();
  }

  // ---- statements

  // Parses until one of `end_tags` opens a block tag (left unconsumed, with its name in
  // *end_tag) or, when `end_tags` is empty, until the end of the template.
  absl::Status ParseBody(std::initializer_list<std::string_view> end_tags,
                         std::vector<NodePtr>* body, std::string* end_tag) {
    DepthGuard guard(&depth_);
    CT_RETURN_IF_ERROR(CheckDepth());
    const Token& opener = i_ > 0 ? toks_[i_ - 1] : Cur();
    while (true) {
      const Token& t = Cur();
      switch (t.type) {
        case Tok::kData: {
          auto n = MakeNode(NodeKind::kText, t);
          n->text = t.text;
          body->push_back(std::move(n));
          Next();
          break;
        }
        case Tok::kVarBegin: {
          auto n = MakeNode(NodeKind::kOutput, t);
          Next();
          CT_ASSIGN_OR_RETURN(n->expr, ParseTuple(true, false));
          if (Cur().type != Tok::kVarEnd) {
            return Unexpected("end of print statement");
          }
          Next();
          body->push_back(std::move(n));
          break;
        }
        case Tok::kBlockBegin: {
          Next();
          if (Cur().type != Tok::kName) {
            return Unexpected("a tag name");
          }
          const std::string& tag = Cur().text;
          if (std::find(end_tags.begin(), end_tags.end(), tag) != end_tags.end()) {
            *end_tag = tag;
            return absl::OkStatus();
          }
          NodePtr n;
          CT_RETURN_IF_ERROR(ParseStatement(end_tags, &n));
          if (n) {
            body->push_back(std::move(n));
          }
          break;
        }
        case Tok::kEof:
          if (end_tags.size() == 0) {
            return absl::OkStatus();
          }
          return Fail(t, absl::StrCat("unexpected end of template; the tag opened at line ",
                                      map_.LineColumn(opener.pos).first, " needs ",
                                      ExpectedTags(end_tags)));
        default:
          return Fail(t, absl::StrCat("unexpected ", Describe(t)));
      }
    }
  }

  static std::string ExpectedTags(std::initializer_list<std::string_view> tags) {
    std::string s;
    for (std::string_view t : tags) {
      if (!s.empty()) {
        s += " or ";
      }
      s += absl::StrCat("'{% ", std::string(t), " %}'");
    }
    return s;
  }

  absl::Status ParseStatement(std::initializer_list<std::string_view> end_tags, NodePtr* out) {
    const Token& tag_tok = Cur();
    const std::string tag = tag_tok.text;
    if (tag == "if") {
      return ParseIf(out);
    }
    if (tag == "for") {
      return ParseFor(out);
    }
    if (tag == "set") {
      return ParseSet(out);
    }
    if (tag == "macro") {
      return ParseMacro(out);
    }
    if (tag == "break" || tag == "continue") {
      if (loop_depth_ == 0) {
        return Fail(tag_tok, absl::StrCat(Quote(tag), " outside loop"));
      }
      *out = MakeNode(tag == "break" ? NodeKind::kBreak : NodeKind::kContinue, tag_tok);
      Next();
      return ExpectBlockEnd();
    }
    if (tag == "with") {
      return ParseWith(out);
    }
    if (tag == "filter") {
      return ParseFilterBlock(out);
    }
    if (tag == "generation") {
      // transformers' AssistantTracker extension: the body renders as is.
      auto n = MakeNode(NodeKind::kScope, tag_tok);
      Next();
      CT_RETURN_IF_ERROR(ExpectBlockEnd());
      std::string end;
      CT_RETURN_IF_ERROR(ParseBody({"endgeneration"}, &n->body, &end));
      Next();
      CT_RETURN_IF_ERROR(ExpectBlockEnd());
      *out = std::move(n);
      return absl::OkStatus();
    }
    if (Contains(kUnsupportedTags, tag)) {
      return Fail(tag_tok, absl::StrCat("unsupported construct: '{% ", tag, " %}'"));
    }
    if (end_tags.size() > 0) {
      return Fail(tag_tok,
                  absl::StrCat("unexpected '{% ", tag, " %}', expected ", ExpectedTags(end_tags)));
    }
    return Fail(tag_tok, absl::StrCat("unknown tag ", Quote(tag)));
  }

  absl::Status ParseIf(NodePtr* out) {
    auto n = MakeNode(NodeKind::kIf, Cur());
    Next();
    while (true) {
      CT_ASSIGN_OR_RETURN(ExprPtr test, ParseTuple(false, false));
      CT_RETURN_IF_ERROR(ExpectBlockEnd());
      std::vector<NodePtr> body;
      std::string end;
      CT_RETURN_IF_ERROR(ParseBody({"elif", "else", "endif"}, &body, &end));
      n->branches.emplace_back(std::move(test), std::move(body));
      Next();
      if (end == "elif") {
        continue;
      }
      if (end == "else") {
        CT_RETURN_IF_ERROR(ExpectBlockEnd());
        CT_RETURN_IF_ERROR(ParseBody({"endif"}, &n->else_body, &end));
        Next();
      }
      break;
    }
    CT_RETURN_IF_ERROR(ExpectBlockEnd());
    *out = std::move(n);
    return absl::OkStatus();
  }

  // Assignment targets: "a", "a, b", "(a, b)".
  absl::Status ParseTargets(std::vector<std::string>* names) {
    bool parens = IsOp("(");
    if (parens) {
      Next();
    }
    while (true) {
      CT_ASSIGN_OR_RETURN(std::string name, ExpectName());
      if (name == "true" || name == "false" || name == "none" || name == "True" ||
          name == "False" || name == "None" || name == "loop") {
        return Fail(toks_[i_ - 1], absl::StrCat("cannot assign to ", Quote(name)));
      }
      names->push_back(std::move(name));
      if (!IsOp(",")) {
        break;
      }
      Next();
      if (parens && IsOp(")")) {
        break;
      }
    }
    if (parens) {
      CT_RETURN_IF_ERROR(ExpectOp(")"));
    }
    return absl::OkStatus();
  }

  absl::Status ParseFor(NodePtr* out) {
    auto n = MakeNode(NodeKind::kFor, Cur());
    Next();
    CT_RETURN_IF_ERROR(ParseTargets(&n->targets));
    if (!IsName("in")) {
      return Unexpected("'in'");
    }
    Next();
    CT_ASSIGN_OR_RETURN(n->expr, ParseTuple(false, false));
    if (IsName("if")) {
      Next();
      CT_ASSIGN_OR_RETURN(n->cond, ParseExpression(true));
    }
    if (IsName("recursive")) {
      return Fail(Cur(), "unsupported construct: recursive for loops");
    }
    CT_RETURN_IF_ERROR(ExpectBlockEnd());
    std::string end;
    ++loop_depth_;
    absl::Status st = ParseBody({"endfor", "else"}, &n->body, &end);
    --loop_depth_;
    CT_RETURN_IF_ERROR(st);
    Next();
    if (end == "else") {
      CT_RETURN_IF_ERROR(ExpectBlockEnd());
      CT_RETURN_IF_ERROR(ParseBody({"endfor"}, &n->else_body, &end));
      Next();
    }
    CT_RETURN_IF_ERROR(ExpectBlockEnd());
    *out = std::move(n);
    return absl::OkStatus();
  }

  absl::Status ParseSet(NodePtr* out) {
    const Token& at = Cur();
    Next();
    if (Cur().type == Tok::kName && Peek().type == Tok::kOp && Peek().text == ".") {
      auto n = MakeNode(NodeKind::kSetAttr, at);
      n->targets.push_back(Cur().text);
      Next();
      Next();
      CT_ASSIGN_OR_RETURN(n->text, ExpectName());
      CT_RETURN_IF_ERROR(ExpectOp("="));
      CT_ASSIGN_OR_RETURN(n->expr, ParseTuple(true, false));
      CT_RETURN_IF_ERROR(ExpectBlockEnd());
      *out = std::move(n);
      return absl::OkStatus();
    }
    std::vector<std::string> targets;
    CT_RETURN_IF_ERROR(ParseTargets(&targets));
    if (IsOp("=")) {
      auto n = MakeNode(NodeKind::kSet, at);
      n->targets = std::move(targets);
      Next();
      CT_ASSIGN_OR_RETURN(n->expr, ParseTuple(true, false));
      CT_RETURN_IF_ERROR(ExpectBlockEnd());
      *out = std::move(n);
      return absl::OkStatus();
    }
    if (targets.size() != 1) {
      return Unexpected("'='");
    }
    auto n = MakeNode(NodeKind::kSetBlock, at);
    n->targets = std::move(targets);
    if (IsOp("|")) {
      CT_ASSIGN_OR_RETURN(n->cond, ParseFilterChain(MakeExpr(ExprKind::kBlockValue, Cur())));
    }
    CT_RETURN_IF_ERROR(ExpectBlockEnd());
    std::string end;
    CT_RETURN_IF_ERROR(ParseBody({"endset"}, &n->body, &end));
    Next();
    CT_RETURN_IF_ERROR(ExpectBlockEnd());
    *out = std::move(n);
    return absl::OkStatus();
  }

  absl::Status ParseMacro(NodePtr* out) {
    auto n = MakeNode(NodeKind::kMacro, Cur());
    Next();
    CT_ASSIGN_OR_RETURN(n->text, ExpectName());
    CT_RETURN_IF_ERROR(ExpectOp("("));
    while (!IsOp(")")) {
      if (!n->params.empty()) {
        CT_RETURN_IF_ERROR(ExpectOp(","));
        if (IsOp(")")) {
          break;
        }
      }
      CT_ASSIGN_OR_RETURN(std::string name, ExpectName());
      ExprPtr def;
      if (IsOp("=")) {
        Next();
        CT_ASSIGN_OR_RETURN(def, ParseExpression(true));
      } else if (!n->params.empty() && n->params.back().second) {
        return Fail(Cur(), "non-default argument follows default argument");
      }
      n->params.emplace_back(std::move(name), std::move(def));
    }
    Next();
    CT_RETURN_IF_ERROR(ExpectBlockEnd());
    // A macro body is a function of its own: break/continue cannot reach an enclosing loop.
    int saved_loops = loop_depth_;
    loop_depth_ = 0;
    std::string end;
    absl::Status st = ParseBody({"endmacro"}, &n->body, &end);
    loop_depth_ = saved_loops;
    CT_RETURN_IF_ERROR(st);
    Next();
    if (Cur().type == Tok::kName && Cur().text == n->text) {
      Next();  // "{% endmacro name %}"
    }
    CT_RETURN_IF_ERROR(ExpectBlockEnd());
    n->catch_varargs = BodyUses(n->body, "varargs");
    n->catch_kwargs = BodyUses(n->body, "kwargs");
    *out = std::move(n);
    return absl::OkStatus();
  }

  // Whether a name is read anywhere in a body (bounded recursion: the tree depth is limited).
  static bool ExprUses(const Expr* e, std::string_view name) {
    if (e == nullptr) {
      return false;
    }
    if (e->kind == ExprKind::kName && e->name == name) {
      return true;
    }
    for (const auto& a : e->args) {
      if (ExprUses(a.get(), name)) {
        return true;
      }
    }
    for (const auto& [k, a] : e->kwargs) {
      if (ExprUses(a.get(), name)) {
        return true;
      }
    }
    return false;
  }
  static bool BodyUses(const std::vector<NodePtr>& body, std::string_view name) {
    for (const auto& n : body) {
      if (ExprUses(n->expr.get(), name) || ExprUses(n->cond.get(), name) ||
          BodyUses(n->body, name) || BodyUses(n->else_body, name)) {
        return true;
      }
      for (const auto& [test, b] : n->branches) {
        if (ExprUses(test.get(), name) || BodyUses(b, name)) {
          return true;
        }
      }
      for (const auto& [p, def] : n->params) {
        if (ExprUses(def.get(), name)) {
          return true;
        }
      }
    }
    return false;
  }

  absl::Status ParseWith(NodePtr* out) {
    auto n = MakeNode(NodeKind::kWith, Cur());
    Next();
    while (Cur().type != Tok::kBlockEnd) {
      if (!n->params.empty()) {
        CT_RETURN_IF_ERROR(ExpectOp(","));
      }
      CT_ASSIGN_OR_RETURN(std::string name, ExpectName());
      CT_RETURN_IF_ERROR(ExpectOp("="));
      CT_ASSIGN_OR_RETURN(ExprPtr value, ParseExpression(true));
      n->params.emplace_back(std::move(name), std::move(value));
    }
    Next();
    std::string end;
    CT_RETURN_IF_ERROR(ParseBody({"endwith"}, &n->body, &end));
    Next();
    CT_RETURN_IF_ERROR(ExpectBlockEnd());
    *out = std::move(n);
    return absl::OkStatus();
  }

  absl::Status ParseFilterBlock(NodePtr* out) {
    auto n = MakeNode(NodeKind::kFilterBlock, Cur());
    Next();
    // "{% filter upper | trim %}": the first filter has no leading pipe.
    ExprPtr value = MakeExpr(ExprKind::kBlockValue, Cur());
    CT_ASSIGN_OR_RETURN(value, ParseOneFilter(std::move(value)));
    if (IsOp("|")) {
      CT_ASSIGN_OR_RETURN(value, ParseFilterChain(std::move(value)));
    }
    n->cond = std::move(value);
    CT_RETURN_IF_ERROR(ExpectBlockEnd());
    std::string end;
    CT_RETURN_IF_ERROR(ParseBody({"endfilter"}, &n->body, &end));
    Next();
    CT_RETURN_IF_ERROR(ExpectBlockEnd());
    *out = std::move(n);
    return absl::OkStatus();
  }

  // ---- expressions

  // A comma-separated list becomes a tuple; `explicit_parens` allows the empty tuple "()".
  absl::StatusOr<ExprPtr> ParseTuple(bool with_condexpr, bool explicit_parens) {
    const Token& at = Cur();
    std::vector<ExprPtr> items;
    bool is_tuple = false;
    while (true) {
      if (!items.empty()) {
        if (!IsOp(",")) {
          break;
        }
        Next();
        is_tuple = true;
      }
      if (Cur().type == Tok::kVarEnd || Cur().type == Tok::kBlockEnd || IsOp(")") ||
          (!items.empty() && IsName("in")) || Cur().type == Tok::kEof) {
        break;
      }
      CT_ASSIGN_OR_RETURN(ExprPtr e, ParseExpression(with_condexpr));
      items.push_back(std::move(e));
    }
    if (!is_tuple) {
      if (items.empty()) {
        if (explicit_parens) {
          auto t = MakeExpr(ExprKind::kTuple, at);
          return Done(std::move(t));
        }
        return Unexpected("an expression");
      }
      return std::move(items[0]);
    }
    auto t = MakeExpr(ExprKind::kTuple, at);
    t->args = std::move(items);
    return Done(std::move(t));
  }

  absl::StatusOr<ExprPtr> ParseExpression(bool with_condexpr) {
    DepthGuard guard(&depth_);
    CT_RETURN_IF_ERROR(CheckDepth());
    return with_condexpr ? ParseCondExpr() : ParseOr();
  }

  absl::StatusOr<ExprPtr> ParseCondExpr() {
    CT_ASSIGN_OR_RETURN(ExprPtr expr, ParseOr());
    while (IsName("if")) {
      auto cond = MakeExpr(ExprKind::kCond, Cur());
      Next();
      CT_ASSIGN_OR_RETURN(ExprPtr test, ParseOr());
      ExprPtr otherwise;
      if (IsName("else")) {
        Next();
        DepthGuard guard(&depth_);
        CT_RETURN_IF_ERROR(CheckDepth());
        CT_ASSIGN_OR_RETURN(otherwise, ParseCondExpr());
      }
      cond->args.push_back(std::move(test));
      cond->args.push_back(std::move(expr));
      cond->args.push_back(std::move(otherwise));
      CT_ASSIGN_OR_RETURN(expr, Done(std::move(cond)));
    }
    return expr;
  }

  template <typename Sub>
  absl::StatusOr<ExprPtr> ParseLeftAssoc(ExprKind kind, std::initializer_list<std::string_view> ops,
                                         bool names, Sub sub) {
    CT_ASSIGN_OR_RETURN(ExprPtr left, (this->*sub)());
    while (true) {
      std::string op;
      for (std::string_view candidate : ops) {
        if (names ? IsName(candidate) : IsOp(candidate)) {
          op = std::string(candidate);
        }
      }
      if (op.empty()) {
        return left;
      }
      auto e = MakeExpr(kind, Cur());
      e->name = op;
      Next();
      CT_ASSIGN_OR_RETURN(ExprPtr right, (this->*sub)());
      e->args.push_back(std::move(left));
      e->args.push_back(std::move(right));
      CT_ASSIGN_OR_RETURN(left, Done(std::move(e)));
    }
  }

  absl::StatusOr<ExprPtr> ParseOr() {
    return ParseLeftAssoc(ExprKind::kOr, {"or"}, true, &Parser::ParseAnd);
  }
  absl::StatusOr<ExprPtr> ParseAnd() {
    return ParseLeftAssoc(ExprKind::kAnd, {"and"}, true, &Parser::ParseNot);
  }
  absl::StatusOr<ExprPtr> ParseNot() {
    if (IsName("not")) {
      auto e = MakeExpr(ExprKind::kNot, Cur());
      Next();
      DepthGuard guard(&depth_);
      CT_RETURN_IF_ERROR(CheckDepth());
      CT_ASSIGN_OR_RETURN(ExprPtr operand, ParseNot());
      e->args.push_back(std::move(operand));
      return Done(std::move(e));
    }
    return ParseCompare();
  }
  absl::StatusOr<ExprPtr> ParseCompare() {
    const Token& at = Cur();
    CT_ASSIGN_OR_RETURN(ExprPtr first, ParseMath1());
    ExprPtr cmp;
    while (true) {
      std::string op;
      if (Cur().type == Tok::kOp &&
          (Cur().text == "==" || Cur().text == "!=" || Cur().text == "<" || Cur().text == "<=" ||
           Cur().text == ">" || Cur().text == ">=")) {
        op = Cur().text;
        Next();
      } else if (IsName("in")) {
        op = "in";
        Next();
      } else if (IsName("not") && Peek().type == Tok::kName && Peek().text == "in") {
        op = "not in";
        Next();
        Next();
      } else {
        break;
      }
      if (!cmp) {
        cmp = MakeExpr(ExprKind::kCompare, at);
        cmp->args.push_back(std::move(first));
      }
      CT_ASSIGN_OR_RETURN(ExprPtr operand, ParseMath1());
      cmp->ops.push_back(std::move(op));
      cmp->args.push_back(std::move(operand));
    }
    if (!cmp) {
      return first;
    }
    return Done(std::move(cmp));
  }
  absl::StatusOr<ExprPtr> ParseMath1() {
    return ParseLeftAssoc(ExprKind::kBinary, {"+", "-"}, false, &Parser::ParseConcat);
  }
  absl::StatusOr<ExprPtr> ParseConcat() {
    const Token& at = Cur();
    CT_ASSIGN_OR_RETURN(ExprPtr first, ParseMath2());
    if (!IsOp("~")) {
      return first;
    }
    auto e = MakeExpr(ExprKind::kConcat, at);
    e->args.push_back(std::move(first));
    while (IsOp("~")) {
      Next();
      CT_ASSIGN_OR_RETURN(ExprPtr operand, ParseMath2());
      e->args.push_back(std::move(operand));
    }
    return Done(std::move(e));
  }
  absl::StatusOr<ExprPtr> ParseMath2() {
    return ParseLeftAssoc(ExprKind::kBinary, {"*", "/", "//", "%"}, false, &Parser::ParsePow);
  }
  absl::StatusOr<ExprPtr> ParsePow() {
    return ParseLeftAssoc(ExprKind::kBinary, {"**"}, false, &Parser::ParseUnaryWithFilter);
  }
  absl::StatusOr<ExprPtr> ParseUnaryWithFilter() { return ParseUnary(true); }

  absl::StatusOr<ExprPtr> ParseUnary(bool with_filter) {
    DepthGuard guard(&depth_);
    CT_RETURN_IF_ERROR(CheckDepth());
    ExprPtr node;
    if (IsOp("-") || IsOp("+")) {
      auto e = MakeExpr(IsOp("-") ? ExprKind::kNeg : ExprKind::kPos, Cur());
      Next();
      CT_ASSIGN_OR_RETURN(ExprPtr operand, ParseUnary(false));
      e->args.push_back(std::move(operand));
      CT_ASSIGN_OR_RETURN(node, Done(std::move(e)));
    } else {
      CT_ASSIGN_OR_RETURN(node, ParsePrimary());
    }
    CT_ASSIGN_OR_RETURN(node, ParsePostfix(std::move(node)));
    if (with_filter) {
      CT_ASSIGN_OR_RETURN(node, ParseFilterExpr(std::move(node)));
    }
    return node;
  }

  absl::StatusOr<ExprPtr> ParsePrimary() {
    const Token& t = Cur();
    switch (t.type) {
      case Tok::kName: {
        auto e = MakeExpr(ExprKind::kLiteral, t);
        if (t.text == "true" || t.text == "True") {
          e->literal = Value::Bool(true);
        } else if (t.text == "false" || t.text == "False") {
          e->literal = Value::Bool(false);
        } else if (t.text == "none" || t.text == "None") {
          e->literal = Value::MakeNone();
        } else {
          e->kind = ExprKind::kName;
          e->name = t.text;
        }
        Next();
        return e;
      }
      case Tok::kString: {
        auto e = MakeExpr(ExprKind::kLiteral, t);
        std::string s;
        while (Cur().type == Tok::kString) {  // adjacent literals concatenate
          s += Cur().text;
          Next();
        }
        e->literal = Value::String(std::move(s));
        return e;
      }
      case Tok::kInt: {
        auto e = MakeExpr(ExprKind::kLiteral, t);
        e->literal = Value::Int(t.int_value);
        Next();
        return e;
      }
      case Tok::kFloat: {
        auto e = MakeExpr(ExprKind::kLiteral, t);
        e->literal = Value::Float(t.float_value);
        Next();
        return e;
      }
      case Tok::kOp:
        if (t.text == "(") {
          Next();
          CT_ASSIGN_OR_RETURN(ExprPtr e, ParseTuple(true, true));
          CT_RETURN_IF_ERROR(ExpectOp(")"));
          return e;
        }
        if (t.text == "[") {
          auto e = MakeExpr(ExprKind::kList, t);
          Next();
          while (!IsOp("]")) {
            if (!e->args.empty()) {
              CT_RETURN_IF_ERROR(ExpectOp(","));
              if (IsOp("]")) {
                break;
              }
            }
            CT_ASSIGN_OR_RETURN(ExprPtr item, ParseExpression(true));
            e->args.push_back(std::move(item));
          }
          Next();
          return Done(std::move(e));
        }
        if (t.text == "{") {
          auto e = MakeExpr(ExprKind::kDict, t);
          Next();
          while (!IsOp("}")) {
            if (!e->args.empty()) {
              CT_RETURN_IF_ERROR(ExpectOp(","));
              if (IsOp("}")) {
                break;
              }
            }
            CT_ASSIGN_OR_RETURN(ExprPtr key, ParseExpression(true));
            CT_RETURN_IF_ERROR(ExpectOp(":"));
            CT_ASSIGN_OR_RETURN(ExprPtr value, ParseExpression(true));
            e->args.push_back(std::move(key));
            e->args.push_back(std::move(value));
          }
          Next();
          return Done(std::move(e));
        }
        break;
      default:
        break;
    }
    return Fail(t, absl::StrCat("unexpected ", Describe(t)));
  }

  absl::StatusOr<ExprPtr> ParsePostfix(ExprPtr node) {
    while (true) {
      if (IsOp(".")) {
        const Token& at = Cur();
        Next();
        if (Cur().type == Tok::kName) {
          auto e = MakeExpr(ExprKind::kGetAttr, at);
          e->name = Cur().text;
          e->args.push_back(std::move(node));
          Next();
          CT_ASSIGN_OR_RETURN(node, Done(std::move(e)));
        } else if (Cur().type == Tok::kInt) {
          auto e = MakeExpr(ExprKind::kGetItem, at);
          auto index = MakeExpr(ExprKind::kLiteral, Cur());
          index->literal = Value::Int(Cur().int_value);
          e->args.push_back(std::move(node));
          e->args.push_back(std::move(index));
          Next();
          CT_ASSIGN_OR_RETURN(node, Done(std::move(e)));
        } else {
          return Unexpected("an attribute name");
        }
      } else if (IsOp("[")) {
        const Token& at = Cur();
        Next();
        std::vector<ExprPtr> subs;
        while (!IsOp("]")) {
          if (!subs.empty()) {
            CT_RETURN_IF_ERROR(ExpectOp(","));
            if (IsOp("]")) {
              break;
            }
          }
          CT_ASSIGN_OR_RETURN(ExprPtr sub, ParseSubscribed());
          subs.push_back(std::move(sub));
        }
        Next();
        if (subs.empty()) {
          return Fail(at, "expected a subscript");
        }
        auto e = MakeExpr(ExprKind::kGetItem, at);
        e->args.push_back(std::move(node));
        if (subs.size() == 1) {
          e->args.push_back(std::move(subs[0]));
        } else {
          auto t = MakeExpr(ExprKind::kTuple, at);
          t->args = std::move(subs);
          CT_ASSIGN_OR_RETURN(ExprPtr tuple, Done(std::move(t)));
          e->args.push_back(std::move(tuple));
        }
        CT_ASSIGN_OR_RETURN(node, Done(std::move(e)));
      } else if (IsOp("(")) {
        CT_ASSIGN_OR_RETURN(node, ParseCall(std::move(node)));
      } else {
        return node;
      }
    }
  }

  absl::StatusOr<ExprPtr> ParseSubscribed() {
    const Token& at = Cur();
    std::vector<ExprPtr> parts;
    if (IsOp(":")) {
      Next();
      parts.push_back(nullptr);
    } else {
      CT_ASSIGN_OR_RETURN(ExprPtr e, ParseExpression(true));
      if (!IsOp(":")) {
        return e;
      }
      Next();
      parts.push_back(std::move(e));
    }
    auto bound = [&]() -> absl::StatusOr<ExprPtr> {
      if (IsOp(":") || IsOp("]") || IsOp(",")) {
        return ExprPtr();
      }
      return ParseExpression(true);
    };
    CT_ASSIGN_OR_RETURN(ExprPtr stop, bound());
    parts.push_back(std::move(stop));
    if (IsOp(":")) {
      Next();
      CT_ASSIGN_OR_RETURN(ExprPtr step, bound());
      parts.push_back(std::move(step));
    } else {
      parts.push_back(nullptr);
    }
    auto e = MakeExpr(ExprKind::kSlice, at);
    e->args = std::move(parts);
    return Done(std::move(e));
  }

  // "(" args ")" into e->args (after whatever is there) and e->kwargs.
  absl::Status ParseCallArgs(Expr* e) {
    CT_RETURN_IF_ERROR(ExpectOp("("));
    bool first = true;
    while (!IsOp(")")) {
      if (!first) {
        CT_RETURN_IF_ERROR(ExpectOp(","));
        if (IsOp(")")) {
          break;
        }
      }
      first = false;
      if (IsOp("*") || IsOp("**")) {
        return Fail(Cur(), "unsupported construct: *args/**kwargs in calls");
      }
      if (Cur().type == Tok::kName && Peek().type == Tok::kOp && Peek().text == "=") {
        std::string key = Cur().text;
        Next();
        Next();
        CT_ASSIGN_OR_RETURN(ExprPtr value, ParseExpression(true));
        e->kwargs.emplace_back(std::move(key), std::move(value));
      } else {
        if (!e->kwargs.empty()) {
          return Fail(Cur(), "positional argument follows keyword argument");
        }
        CT_ASSIGN_OR_RETURN(ExprPtr value, ParseExpression(true));
        e->args.push_back(std::move(value));
      }
    }
    Next();
    return absl::OkStatus();
  }

  absl::StatusOr<ExprPtr> ParseCall(ExprPtr callee) {
    auto e = MakeExpr(ExprKind::kCall, Cur());
    e->args.push_back(std::move(callee));
    CT_RETURN_IF_ERROR(ParseCallArgs(e.get()));
    return Done(std::move(e));
  }

  absl::StatusOr<ExprPtr> ParseFilterExpr(ExprPtr node) {
    while (true) {
      if (IsOp("|")) {
        CT_ASSIGN_OR_RETURN(node, ParseFilterChain(std::move(node)));
      } else if (IsName("is")) {
        CT_ASSIGN_OR_RETURN(node, ParseTest(std::move(node)));
      } else if (IsOp("(")) {
        CT_ASSIGN_OR_RETURN(node, ParseCall(std::move(node)));
      } else {
        return node;
      }
    }
  }

  absl::StatusOr<ExprPtr> ParseFilterChain(ExprPtr node) {
    while (IsOp("|")) {
      Next();
      CT_ASSIGN_OR_RETURN(node, ParseOneFilter(std::move(node)));
    }
    return node;
  }

  absl::StatusOr<ExprPtr> ParseOneFilter(ExprPtr node) {
    const Token& at = Cur();
    CT_ASSIGN_OR_RETURN(std::string name, ExpectName());
    while (IsOp(".")) {
      Next();
      CT_ASSIGN_OR_RETURN(std::string part, ExpectName());
      name += "." + part;
    }
    if (!Contains(kFilters, name)) {
      return Fail(at, absl::StrCat(Contains(kUnsupportedFilters, name) ? "unsupported filter "
                                                                       : "unknown filter ",
                                   Quote(name)));
    }
    auto e = MakeExpr(ExprKind::kFilter, at);
    e->name = std::move(name);
    e->args.push_back(std::move(node));
    if (IsOp("(")) {
      CT_RETURN_IF_ERROR(ParseCallArgs(e.get()));
    }
    return Done(std::move(e));
  }

  absl::StatusOr<ExprPtr> ParseTest(ExprPtr node) {
    auto e = MakeExpr(ExprKind::kTest, Cur());
    Next();  // "is"
    if (IsName("not")) {
      e->negated = true;
      Next();
    }
    const Token& at = Cur();
    std::string name;
    if (Cur().type == Tok::kName) {
      name = Cur().text;
      Next();
      while (IsOp(".")) {
        Next();
        CT_ASSIGN_OR_RETURN(std::string part, ExpectName());
        name += "." + part;
      }
    } else {
      return Unexpected("a test name");
    }
    if (!Contains(kTests, name)) {
      return Fail(at, absl::StrCat(
                          Contains(kUnsupportedTests, name) ? "unsupported test " : "unknown test ",
                          Quote(name)));
    }
    e->name = std::move(name);
    e->args.push_back(std::move(node));
    if (IsOp("(")) {
      CT_RETURN_IF_ERROR(ParseCallArgs(e.get()));
    } else if ((Cur().type == Tok::kName || Cur().type == Tok::kString || Cur().type == Tok::kInt ||
                Cur().type == Tok::kFloat || IsOp("(") || IsOp("[") || IsOp("{")) &&
               !IsName("else") && !IsName("or") && !IsName("and")) {
      if (IsName("is")) {
        return Fail(Cur(), "you cannot chain multiple tests with 'is'");
      }
      // "x is divisibleby 3": one argument without parentheses.
      DepthGuard guard(&depth_);
      CT_RETURN_IF_ERROR(CheckDepth());
      CT_ASSIGN_OR_RETURN(ExprPtr arg, ParsePrimary());
      CT_ASSIGN_OR_RETURN(arg, ParsePostfix(std::move(arg)));
      e->args.push_back(std::move(arg));
    }
    return Done(std::move(e));
  }

  const std::vector<Token>& toks_;
  const SourceMap& map_;
  size_t i_ = 0;
  int depth_ = 0;
  int loop_depth_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Evaluator.

struct Scope {
  std::shared_ptr<Scope> parent;
  std::vector<std::pair<std::string, Value>> vars;

  const Value* Find(std::string_view name) const {
    for (const auto& [k, v] : vars) {
      if (k == name) {
        return &v;
      }
    }
    return nullptr;
  }
  void Set(const std::string& name, Value v) {
    for (auto& [k, old] : vars) {
      if (k == name) {
        old = std::move(v);
        return;
      }
    }
    vars.emplace_back(name, std::move(v));
  }
};
using ScopePtr = std::shared_ptr<Scope>;

enum class Flow { kNormal, kBreak, kContinue };

struct Args {
  std::vector<Value> pos;
  std::vector<std::pair<std::string, Value>> kw;
};

using Params = std::vector<std::optional<Value>>;

// Python's binding of positional and keyword arguments to named parameters.
absl::Status Bind(std::string_view fname, const Args& args,
                  std::initializer_list<std::string_view> names, Params* out) {
  out->assign(names.size(), std::nullopt);
  if (args.pos.size() > names.size()) {
    return absl::InvalidArgumentError(absl::StrCat(std::string(fname), "() takes at most ",
                                                   names.size(), " argument(s) (", args.pos.size(),
                                                   " given)"));
  }
  for (size_t k = 0; k < args.pos.size(); ++k) {
    (*out)[k] = args.pos[k];
  }
  for (const auto& [key, value] : args.kw) {
    auto it = std::find(names.begin(), names.end(), key);
    if (it == names.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat(std::string(fname), "() got an unexpected keyword argument ", Quote(key)));
    }
    auto idx = static_cast<size_t>(it - names.begin());
    if ((*out)[idx]) {
      return absl::InvalidArgumentError(
          absl::StrCat(std::string(fname), "() got multiple values for argument ", Quote(key)));
    }
    (*out)[idx] = value;
  }
  return absl::OkStatus();
}

bool IsNoneOrMissing(const std::optional<Value>& v) {
  return !v || v->is(Type::kNone) || v->IsUndefined();
}

absl::Status TypeError(std::string msg) { return absl::InvalidArgumentError(std::move(msg)); }

absl::Status UndefinedError(const Value& v) {
  return absl::InvalidArgumentError(v.undefined_hint());
}

constexpr std::string_view kStrMethods[] = {
    "strip",      "lstrip",  "rstrip",  "startswith", "endswith",   "split",        "rsplit",
    "splitlines", "upper",   "lower",   "title",      "capitalize", "replace",      "find",
    "rfind",      "index",   "rindex",  "count",      "join",       "format",       "isdigit",
    "isalpha",    "isalnum", "isspace", "isupper",    "islower",    "removeprefix", "removesuffix"};
constexpr std::string_view kDictMethods[] = {"items", "keys", "values", "get"};
constexpr std::string_view kListMethods[] = {"index", "count"};
// Methods that would modify a value: jinja2's ImmutableSandboxedEnvironment refuses them.
constexpr std::string_view kMutators[] = {"append",  "extend", "insert",  "pop",    "remove",
                                          "clear",   "sort",   "reverse", "update", "setdefault",
                                          "popitem", "add",    "discard"};
constexpr std::string_view kGlobals[] = {"range",        "namespace", "dict",   "raise_exception",
                                         "strftime_now", "cycler",    "joiner", "lipsum"};

bool HasMethod(const Value& v, std::string_view name) {
  switch (v.type()) {
    case Type::kString:
      return Contains(kStrMethods, name);
    case Type::kDict:
      return Contains(kDictMethods, name);
    case Type::kList:
      return Contains(kListMethods, name);
    case Type::kLoop:
      return name == "cycle" || name == "changed";
    default:
      return false;
  }
}

// Python slice.indices(): the (start, stop, step) a slice selects from `len` items.
absl::Status SliceIndices(const std::optional<Value>& start_v, const std::optional<Value>& stop_v,
                          const std::optional<Value>& step_v, int64_t len, int64_t* start,
                          int64_t* stop, int64_t* step) {
  for (const auto* v : {&start_v, &stop_v, &step_v}) {
    if (*v && !(*v)->IsIntLike() && !(*v)->is(Type::kNone)) {
      return TypeError("slice indices must be integers or None");
    }
  }
  *step = step_v && step_v->IsIntLike() ? step_v->i() : 1;
  if (*step == 0) {
    return TypeError("slice step cannot be zero");
  }
  if (*step == std::numeric_limits<int64_t>::min()) {
    *step = -std::numeric_limits<int64_t>::max();
  }
  const int64_t lower = *step < 0 ? -1 : 0;
  const int64_t upper = *step < 0 ? len - 1 : len;
  auto fix = [&](const std::optional<Value>& v, int64_t dflt) {
    if (!v || !v->IsIntLike()) {
      return dflt;
    }
    int64_t x = v->i();
    if (x < 0) {
      x = x < -len ? lower : x + len;
      return std::max(x, lower);
    }
    return std::min(x, upper);
  };
  *start = fix(start_v, *step < 0 ? upper : lower);
  *stop = fix(stop_v, *step < 0 ? lower : upper);
  return absl::OkStatus();
}

class Renderer {
 public:
  explicit Renderer(std::unordered_map<std::string, Value> context)
      : context_(std::move(context)) {}

  absl::StatusOr<std::string> Run(const Program& program) {
    std::string out;
    out_ = &out;
    auto root = std::make_shared<Scope>();
    Flow flow = Flow::kNormal;
    CT_RETURN_IF_ERROR(ExecBody(program.body, root, &flow));
    return out;
  }

 private:
  // ---- budget

  absl::Status Step(int64_t n = 1) {
    steps_ += n;
    if (steps_ > kMaxSteps) {
      return absl::ResourceExhaustedError(
          absl::StrCat("chat template exceeded ", kMaxSteps, " evaluation steps"));
    }
    return absl::OkStatus();
  }
  absl::Status ChargeBytes(size_t n) {
    if (n > kMaxStringBytes) {
      return TooLarge();
    }
    return Step(static_cast<int64_t>(n) / kBytesPerStep);
  }
  absl::StatusOr<Value> NewString(std::string s) {
    CT_RETURN_IF_ERROR(ChargeBytes(s.size()));
    return Value::String(std::move(s));
  }
  absl::StatusOr<Value> NewList(std::vector<Value> items, bool is_tuple = false) {
    CT_RETURN_IF_ERROR(Step(static_cast<int64_t>(items.size()) * kStepsPerListItem));
    Value v = Value::List(std::move(items), is_tuple);
    if (v.depth() > kMaxValueDepth) {
      return absl::ResourceExhaustedError("chat template built a value nested too deeply");
    }
    return v;
  }
  absl::StatusOr<Value> NewDict(std::vector<std::pair<Value, Value>> entries) {
    CT_RETURN_IF_ERROR(Step(static_cast<int64_t>(entries.size()) * kStepsPerListItem));
    Value v = Value::Dict(std::move(entries));
    if (v.depth() > kMaxValueDepth) {
      return absl::ResourceExhaustedError("chat template built a value nested too deeply");
    }
    return v;
  }
  absl::Status Emit(std::string_view s) {
    if (out_->size() + s.size() > kMaxOutputBytes) {
      return absl::ResourceExhaustedError(
          absl::StrCat("chat template output exceeds ", kMaxOutputBytes, " bytes"));
    }
    out_->append(s);
    return absl::OkStatus();
  }
  absl::StatusOr<std::string> ToStr(const Value& v) {
    if (v.is(Type::kString)) {
      return v.str();
    }
    std::string s;
    CT_RETURN_IF_ERROR(AppendStr(v, &s));
    CT_RETURN_IF_ERROR(ChargeBytes(s.size()));
    return s;
  }

  // Prefixes runtime errors with the innermost expression's position. raise_exception's
  // message is the template author's and stays as it is.
  absl::Status Locate(int line, int column, absl::Status st) const {
    if (raised_ || st.code() != absl::StatusCode::kInvalidArgument ||
        st.message().substr(0, 5) == "line ") {
      return st;
    }
    return absl::InvalidArgumentError(
        absl::StrCat("line ", line, ", column ", column, ": ", std::string(st.message())));
  }

  // ---- statements

  absl::Status ExecBody(const std::vector<NodePtr>& body, const ScopePtr& scope, Flow* flow) {
    for (const auto& node : body) {
      absl::Status st = Exec(*node, scope, flow);
      if (!st.ok()) {
        return Locate(node->line, node->column, std::move(st));
      }
      if (*flow != Flow::kNormal) {
        return absl::OkStatus();
      }
    }
    return absl::OkStatus();
  }

  absl::StatusOr<std::string> Capture(const std::vector<NodePtr>& body, const ScopePtr& scope) {
    std::string captured;
    std::string* saved = out_;
    out_ = &captured;
    Flow flow = Flow::kNormal;
    absl::Status st = ExecBody(body, scope, &flow);
    out_ = saved;
    CT_RETURN_IF_ERROR(st);
    return captured;
  }

  absl::Status Unpack(const std::vector<std::string>& targets, const Value& v, Scope* scope) {
    if (targets.size() == 1) {
      scope->Set(targets[0], v);
      return absl::OkStatus();
    }
    CT_ASSIGN_OR_RETURN(ListPtr items, Iterate(v));
    if (items->items.size() != targets.size()) {
      return TypeError(absl::StrCat(
          items->items.size() > targets.size() ? "too many" : "not enough",
          " values to unpack (expected ", targets.size(), ", got ", items->items.size(), ")"));
    }
    for (size_t k = 0; k < targets.size(); ++k) {
      scope->Set(targets[k], items->items[k]);
    }
    return absl::OkStatus();
  }

  absl::StatusOr<Value> ApplyBlockFilters(const Expr& filters, std::string text) {
    CT_ASSIGN_OR_RETURN(Value saved, NewString(std::move(text)));
    std::swap(block_value_, saved);
    auto result = Eval(filters, nullptr);
    std::swap(block_value_, saved);
    return result;
  }

  absl::Status Exec(const Node& n, const ScopePtr& scope, Flow* flow) {
    CT_RETURN_IF_ERROR(Step());
    switch (n.kind) {
      case NodeKind::kText:
        return Emit(n.text);
      case NodeKind::kOutput: {
        CT_ASSIGN_OR_RETURN(Value v, Eval(*n.expr, scope.get()));
        if (v.is(Type::kString)) {
          return Emit(v.str());
        }
        std::string s;
        CT_RETURN_IF_ERROR(AppendStr(v, &s));
        return Emit(s);
      }
      case NodeKind::kIf:
        for (const auto& [test, body] : n.branches) {
          CT_ASSIGN_OR_RETURN(Value t, Eval(*test, scope.get()));
          if (Truthy(t)) {
            return ExecBody(body, scope, flow);
          }
        }
        return ExecBody(n.else_body, scope, flow);
      case NodeKind::kFor:
        return ExecFor(n, scope, flow);
      case NodeKind::kSet: {
        CT_ASSIGN_OR_RETURN(Value v, Eval(*n.expr, scope.get()));
        return Unpack(n.targets, v, scope.get());
      }
      case NodeKind::kSetAttr: {
        Value target = Lookup(n.targets[0], scope.get());
        if (!target.is(Type::kNamespace)) {
          return TypeError(absl::StrCat("cannot assign attribute on non-namespace object ",
                                        Quote(n.targets[0])));
        }
        CT_ASSIGN_OR_RETURN(Value v, Eval(*n.expr, scope.get()));
        if (v.HasRef()) {
          return TypeError(
              "unsupported construct: storing a namespace or loop object inside a namespace");
        }
        NamespaceData& ns = target.ns();
        if (Value* slot = ns.Find(n.text)) {
          *slot = std::move(v);
        } else {
          ns.attrs.emplace_back(n.text, std::move(v));
        }
        return absl::OkStatus();
      }
      case NodeKind::kSetBlock: {
        auto inner = std::make_shared<Scope>();
        inner->parent = scope;
        CT_ASSIGN_OR_RETURN(std::string text, Capture(n.body, inner));
        Value v;
        if (n.cond) {
          CT_ASSIGN_OR_RETURN(v, ApplyBlockFilters(*n.cond, std::move(text)));
        } else {
          CT_ASSIGN_OR_RETURN(v, NewString(std::move(text)));
        }
        scope->Set(n.targets[0], std::move(v));
        return absl::OkStatus();
      }
      case NodeKind::kBreak:
        *flow = Flow::kBreak;
        return absl::OkStatus();
      case NodeKind::kContinue:
        *flow = Flow::kContinue;
        return absl::OkStatus();
      case NodeKind::kMacro: {
        auto c = std::make_shared<CallableData>();
        c->kind = CallableData::Kind::kMacro;
        c->name = n.text;
        c->macro = &n;
        c->closure = scope;
        scope->Set(n.text, Value::Callable(std::move(c)));
        return absl::OkStatus();
      }
      case NodeKind::kWith: {
        auto inner = std::make_shared<Scope>();
        inner->parent = scope;
        for (const auto& [name, expr] : n.params) {
          CT_ASSIGN_OR_RETURN(Value v, Eval(*expr, scope.get()));
          inner->Set(name, std::move(v));
        }
        return ExecBody(n.body, inner, flow);
      }
      case NodeKind::kFilterBlock: {
        auto inner = std::make_shared<Scope>();
        inner->parent = scope;
        CT_ASSIGN_OR_RETURN(std::string text, Capture(n.body, inner));
        CT_ASSIGN_OR_RETURN(Value v, ApplyBlockFilters(*n.cond, std::move(text)));
        CT_ASSIGN_OR_RETURN(std::string s, ToStr(v));
        return Emit(s);
      }
      case NodeKind::kScope:
        return ExecBody(n.body, scope, flow);
    }
    return absl::OkStatus();
  }

  absl::Status ExecFor(const Node& n, const ScopePtr& scope, Flow* flow) {
    CT_ASSIGN_OR_RETURN(Value iterable, Eval(*n.expr, scope.get()));
    CT_ASSIGN_OR_RETURN(ListPtr items, Iterate(iterable));
    if (n.cond) {
      // "{% for x in xs if cond %}": the loop (and loop.length) sees only the kept items.
      std::vector<Value> kept;
      for (const auto& item : items->items) {
        auto probe = std::make_shared<Scope>();
        probe->parent = scope;
        CT_RETURN_IF_ERROR(Unpack(n.targets, item, probe.get()));
        CT_ASSIGN_OR_RETURN(Value keep, Eval(*n.cond, probe.get()));
        if (Truthy(keep)) {
          kept.push_back(item);
        }
      }
      CT_ASSIGN_OR_RETURN(Value list, NewList(std::move(kept)));
      items = list.list_ptr();
    }
    auto loop = std::make_shared<LoopData>();
    loop->items = items;
    const Value loop_value = Value::Loop(loop);
    const size_t count = items->items.size();
    for (size_t k = 0; k < count; ++k) {
      CT_RETURN_IF_ERROR(Step());
      auto iteration = std::make_shared<Scope>();
      iteration->parent = scope;
      CT_RETURN_IF_ERROR(Unpack(n.targets, items->items[k], iteration.get()));
      loop->index0 = static_cast<int64_t>(k);
      iteration->Set("loop", loop_value);
      Flow inner = Flow::kNormal;
      CT_RETURN_IF_ERROR(ExecBody(n.body, iteration, &inner));
      if (inner == Flow::kBreak) {
        break;
      }
    }
    if (count == 0 && !n.else_body.empty()) {
      auto inner = std::make_shared<Scope>();
      inner->parent = scope;
      return ExecBody(n.else_body, inner, flow);
    }
    return absl::OkStatus();
  }

  // ---- names and access

  Value Lookup(const std::string& name, const Scope* scope) const {
    for (const Scope* s = scope; s != nullptr; s = s->parent.get()) {
      if (const Value* v = s->Find(name)) {
        return *v;
      }
    }
    if (auto it = context_.find(name); it != context_.end()) {
      return it->second;
    }
    if (Contains(kGlobals, name)) {
      auto c = std::make_shared<CallableData>();
      c->kind = CallableData::Kind::kGlobal;
      c->name = name;
      return Value::Callable(std::move(c));
    }
    return Value::MakeUndefined(absl::StrCat(Quote(name), " is undefined"));
  }

  static Value BoundMethod(const Value& receiver, std::string_view name) {
    auto c = std::make_shared<CallableData>();
    c->kind = CallableData::Kind::kMethod;
    c->name = std::string(name);
    c->receiver = receiver;
    return Value::Callable(std::move(c));
  }

  static Value NoAttribute(const Value& obj, std::string_view name) {
    return Value::MakeUndefined(
        absl::StrCat("'", TypeName(obj), " object' has no attribute ", Quote(name)));
  }

  absl::StatusOr<Value> GetAttr(const Value& obj, std::string_view name) {
    switch (obj.type()) {
      case Type::kUndefined:
        return UndefinedError(obj);
      case Type::kDict:
        if (HasMethod(obj, name)) {
          return BoundMethod(obj, name);
        }
        if (const Value* v = obj.dict().Find(name)) {
          return *v;
        }
        break;
      case Type::kNamespace:
        if (const Value* v = obj.ns().Find(name)) {
          return *v;
        }
        break;
      case Type::kLoop:
        return LoopAttr(obj.loop(), obj, name);
      default:
        if (HasMethod(obj, name)) {
          return BoundMethod(obj, name);
        }
        break;
    }
    if ((obj.is(Type::kList) || obj.is(Type::kDict)) && Contains(kMutators, name)) {
      return Value::MakeUndefined(absl::StrCat("access to attribute ", Quote(name), " of '",
                                               TypeName(obj), "' object is unsafe"));
    }
    return NoAttribute(obj, name);
  }

  Value LoopAttr(const LoopData& loop, const Value& obj, std::string_view name) {
    const int64_t i = loop.index0;
    const int64_t n = loop.length();
    if (name == "index") {
      return Value::Int(i + 1);
    }
    if (name == "index0") {
      return Value::Int(i);
    }
    if (name == "revindex") {
      return Value::Int(n - i);
    }
    if (name == "revindex0") {
      return Value::Int(n - i - 1);
    }
    if (name == "first") {
      return Value::Bool(i == 0);
    }
    if (name == "last") {
      return Value::Bool(i == n - 1);
    }
    if (name == "length") {
      return Value::Int(n);
    }
    if (name == "depth") {
      return Value::Int(1);
    }
    if (name == "depth0") {
      return Value::Int(0);
    }
    if (name == "previtem") {
      return i > 0 ? loop.items->items[static_cast<size_t>(i - 1)]
                   : Value::MakeUndefined("there is no previous item");
    }
    if (name == "nextitem") {
      return i + 1 < n ? loop.items->items[static_cast<size_t>(i + 1)]
                       : Value::MakeUndefined("there is no next item");
    }
    if (HasMethod(obj, name)) {
      return BoundMethod(obj, name);
    }
    return NoAttribute(obj, name);
  }

  absl::StatusOr<Value> GetItem(const Value& obj, const Value& key) {
    switch (obj.type()) {
      case Type::kUndefined:
        return UndefinedError(obj);
      case Type::kDict:
        if (const Value* v = obj.dict().Find(key)) {
          return *v;
        }
        break;
      case Type::kList:
        if (key.IsIntLike()) {
          const auto& items = obj.list().items;
          int64_t idx = key.i();
          const auto n = static_cast<int64_t>(items.size());
          if (idx < 0) {
            idx += n;
          }
          if (idx >= 0 && idx < n) {
            return items[static_cast<size_t>(idx)];
          }
          return Value::MakeUndefined(
              absl::StrCat("'", TypeName(obj), " object' has no element ", key.i()));
        }
        break;
      case Type::kString:
        if (key.IsIntLike()) {
          const std::string& s = obj.str();
          int64_t idx = key.i();
          if (IsAscii(s)) {
            const auto n = static_cast<int64_t>(s.size());
            if (idx < 0) {
              idx += n;
            }
            if (idx >= 0 && idx < n) {
              return Value::String(std::string(1, s[static_cast<size_t>(idx)]));
            }
          } else {
            auto starts = CodePointStarts(s);
            const auto n = static_cast<int64_t>(starts.size()) - 1;
            if (idx < 0) {
              idx += n;
            }
            if (idx >= 0 && idx < n) {
              auto u = static_cast<size_t>(idx);
              return Value::String(s.substr(starts[u], starts[u + 1] - starts[u]));
            }
          }
          return Value::MakeUndefined(absl::StrCat("'str object' has no element ", key.i()));
        }
        break;
      default:
        break;
    }
    // jinja2 falls back to the attribute of that name.
    if (key.is(Type::kString)) {
      return GetAttr(obj, key.str());
    }
    std::string k;
    CT_RETURN_IF_ERROR(AppendRepr(key, &k));
    return Value::MakeUndefined(absl::StrCat("'", TypeName(obj), " object' has no element ", k));
  }

  absl::StatusOr<Value> Slice(const Value& obj, const std::optional<Value>& a,
                              const std::optional<Value>& b, const std::optional<Value>& c) {
    int64_t start = 0;
    int64_t stop = 0;
    int64_t step = 1;
    if (obj.is(Type::kUndefined)) {
      return UndefinedError(obj);
    }
    if (obj.is(Type::kList)) {
      const auto& items = obj.list().items;
      CT_RETURN_IF_ERROR(
          SliceIndices(a, b, c, static_cast<int64_t>(items.size()), &start, &stop, &step));
      std::vector<Value> out;
      for (int64_t k = start; step > 0 ? k < stop : k > stop; k += step) {
        out.push_back(items[static_cast<size_t>(k)]);
        if (step > 0 && k > std::numeric_limits<int64_t>::max() - step) {
          break;
        }
      }
      return NewList(std::move(out), obj.list().is_tuple);
    }
    if (obj.is(Type::kString)) {
      const std::string& s = obj.str();
      std::vector<size_t> starts;
      const bool ascii = IsAscii(s);
      if (!ascii) {
        starts = CodePointStarts(s);
      }
      const auto n = static_cast<int64_t>(ascii ? s.size() : starts.size() - 1);
      CT_RETURN_IF_ERROR(SliceIndices(a, b, c, n, &start, &stop, &step));
      std::string out;
      if (step == 1 && start < stop) {
        out = ascii ? s.substr(static_cast<size_t>(start), static_cast<size_t>(stop - start))
                    : s.substr(
                          starts[static_cast<size_t>(start)],
                          starts[static_cast<size_t>(stop)] - starts[static_cast<size_t>(start)]);
      } else {
        for (int64_t k = start; step > 0 ? k < stop : k > stop; k += step) {
          auto u = static_cast<size_t>(k);
          if (ascii) {
            out.push_back(s[u]);
          } else {
            out.append(s, starts[u], starts[u + 1] - starts[u]);
          }
          if (step > 0 && k > std::numeric_limits<int64_t>::max() - step) {
            break;
          }
        }
      }
      return NewString(std::move(out));
    }
    return Value::MakeUndefined(absl::StrCat("'", TypeName(obj), "' object is not subscriptable"));
  }

  // The items a for loop or a filter walks: list items, dict keys, string characters.
  absl::StatusOr<ListPtr> Iterate(const Value& v) {
    switch (v.type()) {
      case Type::kList:
        return v.list_ptr();
      case Type::kUndefined: {
        static const auto* kEmpty = new ListPtr(std::make_shared<const ListData>());
        return *kEmpty;
      }
      case Type::kDict: {
        std::vector<Value> keys;
        keys.reserve(v.dict().entries.size());
        for (const auto& [k, val] : v.dict().entries) {
          keys.push_back(k);
        }
        CT_ASSIGN_OR_RETURN(Value list, NewList(std::move(keys)));
        return list.list_ptr();
      }
      case Type::kString: {
        const std::string& s = v.str();
        std::vector<Value> chars;
        size_t p = 0;
        while (p < s.size()) {
          size_t start = p;
          NextCodePoint(s, &p);
          chars.push_back(Value::String(s.substr(start, p - start)));
        }
        CT_ASSIGN_OR_RETURN(Value list, NewList(std::move(chars)));
        return list.list_ptr();
      }
      default:
        return TypeError(absl::StrCat("'", TypeName(v), "' object is not iterable"));
    }
  }

  absl::StatusOr<int64_t> Length(const Value& v) {
    switch (v.type()) {
      case Type::kUndefined:
        return 0;
      case Type::kString:
        return static_cast<int64_t>(CodePointCount(v.str()));
      case Type::kList:
        return static_cast<int64_t>(v.list().items.size());
      case Type::kDict:
        return static_cast<int64_t>(v.dict().entries.size());
      default:
        return TypeError(absl::StrCat("object of type '", TypeName(v), "' has no len()"));
    }
  }

  // jinja2's attribute getter for filters: "a.b.0" walks items (then attributes).
  absl::StatusOr<Value> GetPath(const Value& obj, const Value& path) {
    if (path.IsIntLike()) {
      return GetItem(obj, path);
    }
    CT_ASSIGN_OR_RETURN(std::string p, ToStr(path));
    Value cur = obj;
    size_t start = 0;
    while (true) {
      size_t dot = p.find('.', start);
      std::string part =
          p.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
      int64_t idx = 0;
      auto res = std::from_chars(part.data(), part.data() + part.size(), idx);
      if (!part.empty() && res.ec == std::errc() && res.ptr == part.data() + part.size()) {
        CT_ASSIGN_OR_RETURN(cur, GetItem(cur, Value::Int(idx)));
      } else {
        CT_ASSIGN_OR_RETURN(cur, GetItem(cur, Value::String(part)));
      }
      if (dot == std::string::npos) {
        return cur;
      }
      start = dot + 1;
    }
  }

  // ---- expressions

  absl::StatusOr<Value> Eval(const Expr& e, const Scope* scope) {
    auto result = EvalInner(e, scope);
    if (!result.ok()) {
      return Locate(e.line, e.column, result.status());
    }
    return result;
  }

  absl::StatusOr<Value> EvalInner(const Expr& e, const Scope* scope) {
    CT_RETURN_IF_ERROR(Step());
    switch (e.kind) {
      case ExprKind::kLiteral:
        return e.literal;
      case ExprKind::kName:
        return Lookup(e.name, scope);
      case ExprKind::kBlockValue:
        return block_value_;
      case ExprKind::kList:
      case ExprKind::kTuple: {
        std::vector<Value> items;
        items.reserve(e.args.size());
        for (const auto& a : e.args) {
          CT_ASSIGN_OR_RETURN(Value v, Eval(*a, scope));
          items.push_back(std::move(v));
        }
        return NewList(std::move(items), e.kind == ExprKind::kTuple);
      }
      case ExprKind::kDict: {
        std::vector<std::pair<Value, Value>> entries;
        for (size_t k = 0; k + 1 < e.args.size(); k += 2) {
          CT_ASSIGN_OR_RETURN(Value key, Eval(*e.args[k], scope));
          CT_ASSIGN_OR_RETURN(Value value, Eval(*e.args[k + 1], scope));
          if (!IsHashable(key)) {
            return TypeError(absl::StrCat("unhashable type: ", Quote(TypeName(key))));
          }
          auto it = std::find_if(entries.begin(), entries.end(),
                                 [&](const auto& kv) { return Equal(kv.first, key); });
          if (it != entries.end()) {
            it->second = std::move(value);
          } else {
            entries.emplace_back(std::move(key), std::move(value));
          }
        }
        return NewDict(std::move(entries));
      }
      case ExprKind::kNeg:
      case ExprKind::kPos: {
        CT_ASSIGN_OR_RETURN(Value v, Eval(*e.args[0], scope));
        if (v.IsUndefined()) {
          return UndefinedError(v);
        }
        if (v.IsIntLike()) {
          if (e.kind == ExprKind::kPos) {
            return Value::Int(v.i());
          }
          if (v.i() == std::numeric_limits<int64_t>::min()) {
            return TypeError("integer overflow");
          }
          return Value::Int(-v.i());
        }
        if (v.is(Type::kFloat)) {
          return Value::Float(e.kind == ExprKind::kNeg ? -v.f() : v.f());
        }
        return TypeError(absl::StrCat("bad operand type for unary ",
                                      e.kind == ExprKind::kNeg ? "-" : "+", ": ",
                                      Quote(TypeName(v))));
      }
      case ExprKind::kNot: {
        CT_ASSIGN_OR_RETURN(Value v, Eval(*e.args[0], scope));
        return Value::Bool(!Truthy(v));
      }
      case ExprKind::kAnd:
      case ExprKind::kOr: {
        CT_ASSIGN_OR_RETURN(Value left, Eval(*e.args[0], scope));
        if (Truthy(left) == (e.kind == ExprKind::kOr)) {
          return left;
        }
        return Eval(*e.args[1], scope);
      }
      case ExprKind::kCond: {
        CT_ASSIGN_OR_RETURN(Value test, Eval(*e.args[0], scope));
        if (Truthy(test)) {
          return Eval(*e.args[1], scope);
        }
        if (e.args[2]) {
          return Eval(*e.args[2], scope);
        }
        return Value::MakeUndefined(
            "the inline if-expression evaluated to false and no else section was defined");
      }
      case ExprKind::kBinary: {
        CT_ASSIGN_OR_RETURN(Value left, Eval(*e.args[0], scope));
        CT_ASSIGN_OR_RETURN(Value right, Eval(*e.args[1], scope));
        return BinaryOp(e.name, left, right);
      }
      case ExprKind::kConcat: {
        std::string s;
        for (const auto& a : e.args) {
          CT_ASSIGN_OR_RETURN(Value v, Eval(*a, scope));
          CT_RETURN_IF_ERROR(AppendStr(v, &s));
          if (s.size() > kMaxStringBytes) {
            return TooLarge();
          }
        }
        return NewString(std::move(s));
      }
      case ExprKind::kCompare: {
        CT_ASSIGN_OR_RETURN(Value left, Eval(*e.args[0], scope));
        for (size_t k = 0; k < e.ops.size(); ++k) {
          CT_ASSIGN_OR_RETURN(Value right, Eval(*e.args[k + 1], scope));
          CT_ASSIGN_OR_RETURN(bool ok, CompareOp(e.ops[k], left, right));
          if (!ok) {
            return Value::Bool(false);
          }
          left = std::move(right);
        }
        return Value::Bool(true);
      }
      case ExprKind::kGetAttr: {
        CT_ASSIGN_OR_RETURN(Value obj, Eval(*e.args[0], scope));
        return GetAttr(obj, e.name);
      }
      case ExprKind::kGetItem: {
        CT_ASSIGN_OR_RETURN(Value obj, Eval(*e.args[0], scope));
        const Expr& index = *e.args[1];
        if (index.kind == ExprKind::kSlice) {
          std::optional<Value> parts[3];
          for (size_t k = 0; k < 3; ++k) {
            if (index.args[k]) {
              CT_ASSIGN_OR_RETURN(parts[k], Eval(*index.args[k], scope));
            }
          }
          return Slice(obj, parts[0], parts[1], parts[2]);
        }
        CT_ASSIGN_OR_RETURN(Value key, Eval(index, scope));
        return GetItem(obj, key);
      }
      case ExprKind::kSlice:
        return TypeError("a slice is only valid inside []");
      case ExprKind::kCall:
        return EvalCall(e, scope);
      case ExprKind::kFilter: {
        CT_ASSIGN_OR_RETURN(Value operand, Eval(*e.args[0], scope));
        CT_ASSIGN_OR_RETURN(Args args, EvalArgs(e, scope));
        return ApplyFilter(e.name, operand, args);
      }
      case ExprKind::kTest: {
        CT_ASSIGN_OR_RETURN(Value operand, Eval(*e.args[0], scope));
        CT_ASSIGN_OR_RETURN(Args args, EvalArgs(e, scope));
        CT_ASSIGN_OR_RETURN(bool r, ApplyTest(e.name, operand, args));
        return Value::Bool(r != e.negated);
      }
    }
    return TypeError("unknown expression");
  }

  // Positional arguments are args[1:] (args[0] is the callee, filtered or tested value).
  absl::StatusOr<Args> EvalArgs(const Expr& e, const Scope* scope) {
    Args args;
    for (size_t k = 1; k < e.args.size(); ++k) {
      CT_ASSIGN_OR_RETURN(Value v, Eval(*e.args[k], scope));
      args.pos.push_back(std::move(v));
    }
    for (const auto& [name, expr] : e.kwargs) {
      CT_ASSIGN_OR_RETURN(Value v, Eval(*expr, scope));
      args.kw.emplace_back(name, std::move(v));
    }
    return args;
  }

  absl::StatusOr<Value> EvalCall(const Expr& e, const Scope* scope) {
    const Expr& callee = *e.args[0];
    Value fn;
    if (callee.kind == ExprKind::kGetAttr) {
      // obj.method(...): call the built-in method without materialising a bound method.
      CT_ASSIGN_OR_RETURN(Value obj, Eval(*callee.args[0], scope));
      if (obj.IsUndefined()) {
        return UndefinedError(obj);
      }
      if (HasMethod(obj, callee.name) && !obj.is(Type::kLoop)) {
        CT_ASSIGN_OR_RETURN(Args args, EvalArgs(e, scope));
        return CallMethod(obj, callee.name, args);
      }
      CT_ASSIGN_OR_RETURN(fn, GetAttr(obj, callee.name));
    } else {
      CT_ASSIGN_OR_RETURN(fn, Eval(callee, scope));
    }
    CT_ASSIGN_OR_RETURN(Args args, EvalArgs(e, scope));
    return CallValue(fn, args);
  }

  absl::StatusOr<Value> CallValue(const Value& fn, const Args& args) {
    if (fn.IsUndefined()) {
      return UndefinedError(fn);
    }
    if (!fn.is(Type::kCallable)) {
      return TypeError(absl::StrCat(Quote(TypeName(fn)), " object is not callable"));
    }
    const CallableData& c = fn.callable();
    switch (c.kind) {
      case CallableData::Kind::kGlobal:
        return CallGlobal(c.name, args);
      case CallableData::Kind::kMethod:
        return CallMethod(c.receiver, c.name, args);
      case CallableData::Kind::kMacro:
        return CallMacro(c, args);
    }
    return TypeError("not callable");
  }

  absl::StatusOr<Value> CallMacro(const CallableData& c, const Args& args) {
    if (call_depth_ >= kMaxCallDepth) {
      return absl::ResourceExhaustedError(
          absl::StrCat("chat template macros nested deeper than ", kMaxCallDepth, " calls"));
    }
    ScopePtr closure = c.closure.lock();
    if (!closure) {
      return TypeError(absl::StrCat("macro ", Quote(c.name), " called outside its scope"));
    }
    const Node& m = *c.macro;
    auto scope = std::make_shared<Scope>();
    scope->parent = closure;
    std::vector<std::optional<Value>> bound(m.params.size());
    std::vector<Value> varargs;
    for (size_t k = 0; k < args.pos.size(); ++k) {
      if (k < m.params.size()) {
        bound[k] = args.pos[k];
      } else if (m.catch_varargs) {
        varargs.push_back(args.pos[k]);
      } else {
        return TypeError(absl::StrCat("macro ", Quote(c.name), " takes not more than ",
                                      m.params.size(), " argument(s)"));
      }
    }
    std::vector<std::pair<Value, Value>> kwargs;
    for (const auto& [key, value] : args.kw) {
      auto it = std::find_if(m.params.begin(), m.params.end(),
                             [&](const auto& p) { return p.first == key; });
      if (it != m.params.end()) {
        auto idx = static_cast<size_t>(it - m.params.begin());
        if (bound[idx]) {
          return TypeError(absl::StrCat("macro ", Quote(c.name),
                                        " got multiple values for argument ", Quote(key)));
        }
        bound[idx] = value;
      } else if (m.catch_kwargs) {
        kwargs.emplace_back(Value::String(key), value);
      } else {
        return TypeError(
            absl::StrCat("macro ", Quote(c.name), " takes no keyword argument ", Quote(key)));
      }
    }
    ++call_depth_;
    absl::StatusOr<std::string> text = [&]() -> absl::StatusOr<std::string> {
      for (size_t k = 0; k < m.params.size(); ++k) {
        if (bound[k]) {
          scope->Set(m.params[k].first, *bound[k]);
        } else if (m.params[k].second) {
          CT_ASSIGN_OR_RETURN(Value v, Eval(*m.params[k].second, scope.get()));
          scope->Set(m.params[k].first, std::move(v));
        } else {
          scope->Set(m.params[k].first,
                     Value::MakeUndefined(absl::StrCat("parameter ", Quote(m.params[k].first),
                                                       " was not provided")));
        }
      }
      if (m.catch_varargs) {
        CT_ASSIGN_OR_RETURN(Value v, NewList(std::move(varargs), true));
        scope->Set("varargs", std::move(v));
      }
      if (m.catch_kwargs) {
        CT_ASSIGN_OR_RETURN(Value v, NewDict(std::move(kwargs)));
        scope->Set("kwargs", std::move(v));
      }
      return Capture(m.body, scope);
    }();
    --call_depth_;
    if (!text.ok()) {
      return text.status();
    }
    return NewString(*std::move(text));
  }

  // ---- operators

  static absl::Status UnsupportedOperands(std::string_view op, const Value& a, const Value& b) {
    if (a.is(Type::kString) && op == "+") {
      return TypeError(absl::StrCat("can only concatenate str (not \"", TypeName(b), "\") to str"));
    }
    if (a.is(Type::kList) && op == "+") {
      return TypeError(absl::StrCat("can only concatenate ", TypeName(a), " (not \"", TypeName(b),
                                    "\") to ", TypeName(a)));
    }
    return TypeError(absl::StrCat("unsupported operand type(s) for ", std::string(op), ": ",
                                  Quote(TypeName(a)), " and ", Quote(TypeName(b))));
  }

  absl::StatusOr<Value> Repeat(const Value& seq, int64_t times) {
    times = std::max<int64_t>(times, 0);
    if (seq.is(Type::kString)) {
      const std::string& s = seq.str();
      if (!s.empty() && static_cast<uint64_t>(times) > kMaxStringBytes / s.size()) {
        return TooLarge();
      }
      CT_RETURN_IF_ERROR(ChargeBytes(s.size() * static_cast<size_t>(times)));
      std::string out;
      out.reserve(s.size() * static_cast<size_t>(times));
      for (int64_t k = 0; k < times; ++k) {
        out += s;
      }
      return Value::String(std::move(out));
    }
    const auto& items = seq.list().items;
    if (!items.empty() &&
        static_cast<uint64_t>(times) > static_cast<uint64_t>(kMaxSteps) / items.size()) {
      return Step(kMaxSteps + 1);
    }
    CT_RETURN_IF_ERROR(Step(static_cast<int64_t>(items.size()) * times * kStepsPerListItem));
    std::vector<Value> out;
    out.reserve(items.size() * static_cast<size_t>(times));
    for (int64_t k = 0; k < times; ++k) {
      out.insert(out.end(), items.begin(), items.end());
    }
    return NewList(std::move(out), seq.list().is_tuple);
  }

  absl::StatusOr<Value> BinaryOp(const std::string& op, const Value& a, const Value& b) {
    if (a.IsUndefined()) {
      return UndefinedError(a);
    }
    if (b.IsUndefined()) {
      return UndefinedError(b);
    }
    const bool ints = a.IsIntLike() && b.IsIntLike();
    const bool nums = a.IsNumber() && b.IsNumber();
    int64_t r = 0;
    if (op == "+") {
      if (ints) {
        if (!CheckedAdd(a.i(), b.i(), &r)) {
          return TypeError("integer overflow");
        }
        return Value::Int(r);
      }
      if (nums) {
        return Value::Float(a.f() + b.f());
      }
      if (a.is(Type::kString) && b.is(Type::kString)) {
        CT_RETURN_IF_ERROR(ChargeBytes(a.str().size() + b.str().size()));
        return Value::String(a.str() + b.str());
      }
      if (a.is(Type::kList) && b.is(Type::kList) && a.list().is_tuple == b.list().is_tuple) {
        // Charged before copying, so a list that would blow the budget is never built.
        CT_RETURN_IF_ERROR(
            Step(static_cast<int64_t>(a.list().items.size() + b.list().items.size()) *
                 kStepsPerListItem));
        std::vector<Value> items = a.list().items;
        items.insert(items.end(), b.list().items.begin(), b.list().items.end());
        return NewList(std::move(items), a.list().is_tuple);
      }
      return UnsupportedOperands(op, a, b);
    }
    if (op == "-") {
      if (ints) {
        if (!CheckedSub(a.i(), b.i(), &r)) {
          return TypeError("integer overflow");
        }
        return Value::Int(r);
      }
      if (nums) {
        return Value::Float(a.f() - b.f());
      }
      return UnsupportedOperands(op, a, b);
    }
    if (op == "*") {
      if (ints) {
        if (!CheckedMul(a.i(), b.i(), &r)) {
          return TypeError("integer overflow");
        }
        return Value::Int(r);
      }
      if (nums) {
        return Value::Float(a.f() * b.f());
      }
      if ((a.is(Type::kString) || a.is(Type::kList)) && b.IsIntLike()) {
        return Repeat(a, b.i());
      }
      if ((b.is(Type::kString) || b.is(Type::kList)) && a.IsIntLike()) {
        return Repeat(b, a.i());
      }
      return UnsupportedOperands(op, a, b);
    }
    if (op == "/" || op == "//" || op == "%") {
      if (op == "%" && a.is(Type::kString)) {
        return TypeError("unsupported construct: printf-style string formatting with '%'");
      }
      if (!nums) {
        return UnsupportedOperands(op, a, b);
      }
      if (b.f() == 0) {
        return TypeError(op == "%" ? "integer modulo by zero" : "division by zero");
      }
      if (op == "/") {
        return Value::Float(a.f() / b.f());
      }
      if (ints) {
        if (a.i() == std::numeric_limits<int64_t>::min() && b.i() == -1) {
          return TypeError("integer overflow");
        }
        int64_t q = a.i() / b.i();
        int64_t m = a.i() % b.i();
        if (m != 0 && ((m < 0) != (b.i() < 0))) {
          --q;
          m += b.i();
        }
        return Value::Int(op == "//" ? q : m);
      }
      // CPython's float divmod.
      const double x = a.f();
      const double y = b.f();
      double m = std::fmod(x, y);
      double div = (x - m) / y;
      if (m != 0) {
        if ((y < 0) != (m < 0)) {
          m += y;
          div -= 1.0;
        }
      } else {
        m = std::copysign(0.0, y);
      }
      if (op == "%") {
        return Value::Float(m);
      }
      double floordiv = std::copysign(0.0, x / y);
      if (div != 0) {
        floordiv = std::floor(div);
        if (div - floordiv > 0.5) {
          floordiv += 1.0;
        }
      }
      return Value::Float(floordiv);
    }
    if (op == "**") {
      if (!nums) {
        return UnsupportedOperands(op, a, b);
      }
      if (ints && b.i() >= 0) {
        int64_t base = a.i();
        int64_t exp = b.i();
        int64_t result = 1;
        while (exp > 0) {
          if (exp & 1) {
            if (!CheckedMul(result, base, &result)) {
              return TypeError("integer overflow");
            }
          }
          exp >>= 1;
          if (exp > 0 && !CheckedMul(base, base, &base)) {
            return TypeError("integer overflow");
          }
        }
        return Value::Int(result);
      }
      if (a.f() == 0 && b.f() < 0) {
        return TypeError("0.0 cannot be raised to a negative power");
      }
      if (a.f() < 0 && std::floor(b.f()) != b.f()) {
        return TypeError("unsupported construct: complex results of '**'");
      }
      return Value::Float(std::pow(a.f(), b.f()));
    }
    return TypeError(absl::StrCat("unknown operator ", Quote(op)));
  }

  // Python ordering: negative, zero or positive; TypeError across unordered types.
  absl::StatusOr<int> Order(const Value& a, const Value& b, std::string_view op) {
    if (a.IsUndefined()) {
      return UndefinedError(a);
    }
    if (b.IsUndefined()) {
      return UndefinedError(b);
    }
    if (a.IsNumber() && b.IsNumber()) {
      if (a.IsIntLike() && b.IsIntLike()) {
        return a.i() < b.i() ? -1 : a.i() > b.i() ? 1 : 0;
      }
      return a.f() < b.f() ? -1 : a.f() > b.f() ? 1 : 0;
    }
    if (a.is(Type::kString) && b.is(Type::kString)) {
      int c = a.str().compare(b.str());
      return c < 0 ? -1 : c > 0 ? 1 : 0;
    }
    if (a.is(Type::kList) && b.is(Type::kList) && a.list().is_tuple == b.list().is_tuple) {
      const auto& x = a.list().items;
      const auto& y = b.list().items;
      for (size_t k = 0; k < x.size() && k < y.size(); ++k) {
        CT_RETURN_IF_ERROR(Step());
        if (!Equal(x[k], y[k])) {
          return Order(x[k], y[k], op);
        }
      }
      return x.size() < y.size() ? -1 : x.size() > y.size() ? 1 : 0;
    }
    return TypeError(absl::StrCat(Quote(op), " not supported between instances of ",
                                  Quote(TypeName(a)), " and ", Quote(TypeName(b))));
  }

  absl::StatusOr<bool> In(const Value& needle, const Value& haystack) {
    switch (haystack.type()) {
      case Type::kUndefined:
        return false;
      case Type::kString:
        if (!needle.is(Type::kString)) {
          return TypeError(absl::StrCat("'in <string>' requires string as left operand, not ",
                                        TypeName(needle)));
        }
        return haystack.str().find(needle.str()) != std::string::npos;
      case Type::kList:
        for (const auto& item : haystack.list().items) {
          if (Equal(item, needle)) {
            return true;
          }
        }
        CT_RETURN_IF_ERROR(Step(static_cast<int64_t>(haystack.list().items.size())));
        return false;
      case Type::kDict:
        if (!IsHashable(needle)) {
          return TypeError(absl::StrCat("unhashable type: ", Quote(TypeName(needle))));
        }
        return haystack.dict().Find(needle) != nullptr;
      default:
        return TypeError(
            absl::StrCat("argument of type ", Quote(TypeName(haystack)), " is not iterable"));
    }
  }

  absl::StatusOr<bool> CompareOp(std::string_view op, const Value& a, const Value& b) {
    if (op == "==") {
      return Equal(a, b);
    }
    if (op == "!=") {
      return !Equal(a, b);
    }
    if (op == "in") {
      return In(a, b);
    }
    if (op == "not in") {
      CT_ASSIGN_OR_RETURN(bool in, In(a, b));
      return !in;
    }
    CT_ASSIGN_OR_RETURN(int c, Order(a, b, op));
    if (op == "<") {
      return c < 0;
    }
    if (op == "<=") {
      return c <= 0;
    }
    if (op == ">") {
      return c > 0;
    }
    return c >= 0;
  }

  // ---- globals

  absl::StatusOr<Value> CallGlobal(const std::string& name, const Args& args) {
    if (name == "raise_exception") {
      Params p;
      CT_RETURN_IF_ERROR(Bind(name, args, {"message"}, &p));
      std::string message;
      if (p[0]) {
        CT_ASSIGN_OR_RETURN(message, ToStr(*p[0]));
      }
      raised_ = true;
      return absl::InvalidArgumentError(message);
    }
    if (name == "strftime_now") {
      Params p;
      CT_RETURN_IF_ERROR(Bind(name, args, {"format"}, &p));
      if (!p[0] || !p[0]->is(Type::kString)) {
        return TypeError("strftime_now() argument must be str");
      }
      return StrftimeNow(p[0]->str());
    }
    if (name == "range") {
      if (!args.kw.empty() || args.pos.empty() || args.pos.size() > 3) {
        return TypeError("range() takes 1 to 3 positional arguments");
      }
      for (const auto& v : args.pos) {
        if (!v.IsIntLike()) {
          return TypeError(
              absl::StrCat(Quote(TypeName(v)), " object cannot be interpreted as an integer"));
        }
      }
      int64_t start = args.pos.size() == 1 ? 0 : args.pos[0].i();
      int64_t stop = args.pos.size() == 1 ? args.pos[0].i() : args.pos[1].i();
      int64_t step = args.pos.size() == 3 ? args.pos[2].i() : 1;
      if (step == 0) {
        return TypeError("range() arg 3 must not be zero");
      }
      // Count in 128 bits: start, stop and step are untrusted.
      __int128 span =
          step > 0 ? static_cast<__int128>(stop) - start : static_cast<__int128>(start) - stop;
      __int128 mag = step > 0 ? step : -static_cast<__int128>(step);
      __int128 count = span <= 0 ? 0 : (span + mag - 1) / mag;
      if (count > kMaxRange) {
        return absl::ResourceExhaustedError(
            absl::StrCat("range() of more than ", kMaxRange, " items (jinja2's sandbox limit)"));
      }
      std::vector<Value> items;
      items.reserve(static_cast<size_t>(count));
      for (__int128 k = 0; k < count; ++k) {
        items.push_back(Value::Int(static_cast<int64_t>(start + k * step)));
      }
      return NewList(std::move(items));
    }
    if (name == "namespace" || name == "dict") {
      std::vector<std::pair<Value, Value>> entries;
      for (const auto& v : args.pos) {
        if (!v.is(Type::kDict)) {
          return TypeError(absl::StrCat(name, "() positional arguments must be dicts"));
        }
        for (const auto& kv : v.dict().entries) {
          entries.push_back(kv);
        }
      }
      for (const auto& [k, v] : args.kw) {
        entries.emplace_back(Value::String(k), v);
      }
      if (name == "dict") {
        return NewDict(std::move(entries));
      }
      auto ns = std::make_shared<NamespaceData>();
      for (auto& [k, v] : entries) {
        if (!k.is(Type::kString)) {
          return TypeError("namespace() keys must be strings");
        }
        if (v.HasRef()) {
          return TypeError(
              "unsupported construct: storing a namespace or loop object inside a namespace");
        }
        if (Value* slot = ns->Find(k.str())) {
          *slot = std::move(v);
        } else {
          ns->attrs.emplace_back(k.str(), std::move(v));
        }
      }
      return Value::Namespace(std::move(ns));
    }
    return TypeError(absl::StrCat("unsupported construct: the global function ", Quote(name)));
  }

  absl::StatusOr<Value> StrftimeNow(const std::string& format) {
    if (format.size() > 1024) {
      return TypeError("strftime_now() format is too long");
    }
    std::time_t now = std::time(nullptr);
    std::tm local{};
    localtime_r(&now, &local);
    std::string buf;
    for (size_t cap = 256; cap <= 65536; cap *= 4) {
      buf.resize(cap);
      size_t n = std::strftime(buf.data(), cap, format.c_str(), &local);
      if (n > 0 || format.empty()) {
        buf.resize(n);
        return NewString(std::move(buf));
      }
    }
    return Value::String("");
  }

  // ---- methods of str, dict, list and the loop object

  static absl::StatusOr<std::optional<std::string>> OptionalString(const std::optional<Value>& v,
                                                                   std::string_view what) {
    if (IsNoneOrMissing(v)) {
      return std::optional<std::string>();
    }
    if (!v->is(Type::kString)) {
      return TypeError(absl::StrCat(std::string(what), " arg must be None or str"));
    }
    return std::optional<std::string>(v->str());
  }

  absl::StatusOr<Value> SplitString(const std::string& s, const std::optional<Value>& sep_v,
                                    const std::optional<Value>& max_v, bool from_right) {
    CT_ASSIGN_OR_RETURN(std::optional<std::string> sep, OptionalString(sep_v, "split()"));
    int64_t maxsplit = -1;
    if (max_v && !max_v->is(Type::kNone)) {
      if (!max_v->IsIntLike()) {
        return TypeError("split() maxsplit must be an integer");
      }
      maxsplit = max_v->i();
    }
    std::vector<std::string> parts;
    if (sep) {
      if (sep->empty()) {
        return TypeError("empty separator");
      }
      if (!from_right) {
        size_t start = 0;
        while (maxsplit < 0 || static_cast<int64_t>(parts.size()) < maxsplit) {
          size_t hit = s.find(*sep, start);
          if (hit == std::string::npos) {
            break;
          }
          parts.push_back(s.substr(start, hit - start));
          start = hit + sep->size();
        }
        parts.push_back(s.substr(start));
      } else {
        size_t end = s.size();
        std::vector<std::string> rev;
        while (maxsplit < 0 || static_cast<int64_t>(rev.size()) < maxsplit) {
          if (end < sep->size()) {
            break;
          }
          size_t hit = s.rfind(*sep, end - sep->size());
          if (hit == std::string::npos) {
            break;
          }
          rev.push_back(s.substr(hit + sep->size(), end - hit - sep->size()));
          end = hit;
        }
        rev.push_back(s.substr(0, end));
        parts.assign(rev.rbegin(), rev.rend());
      }
    } else {
      // Runs of whitespace separate; leading and trailing whitespace is dropped.
      std::vector<std::pair<size_t, size_t>> words;  // byte ranges
      size_t p = 0;
      while (p < s.size()) {
        size_t q = p;
        if (IsPySpace(NextCodePoint(s, &q))) {
          p = q;
          continue;
        }
        size_t start = p;
        while (p < s.size()) {
          q = p;
          if (IsPySpace(NextCodePoint(s, &q))) {
            break;
          }
          p = q;
        }
        words.emplace_back(start, p);
      }
      if (maxsplit >= 0 && static_cast<int64_t>(words.size()) > maxsplit) {
        if (!from_right) {
          for (int64_t k = 0; k < maxsplit; ++k) {
            parts.push_back(s.substr(words[k].first, words[k].second - words[k].first));
          }
          parts.push_back(s.substr(words[maxsplit].first));
        } else {
          size_t first_kept = words.size() - static_cast<size_t>(maxsplit);
          parts.push_back(s.substr(0, words[first_kept - 1].second));
          for (size_t k = first_kept; k < words.size(); ++k) {
            parts.push_back(s.substr(words[k].first, words[k].second - words[k].first));
          }
        }
      } else {
        for (const auto& [a, b] : words) {
          parts.push_back(s.substr(a, b - a));
        }
      }
    }
    std::vector<Value> items;
    items.reserve(parts.size());
    for (auto& part : parts) {
      items.push_back(Value::String(std::move(part)));
    }
    return NewList(std::move(items));
  }

  absl::StatusOr<Value> ReplaceString(const std::string& s, const std::string& old,
                                      const std::string& repl, int64_t count) {
    std::string out;
    int64_t done = 0;
    if (old.empty()) {
      // Python inserts the replacement before every character and at the end.
      size_t p = 0;
      while (true) {
        if (count >= 0 && done >= count) {
          out.append(s, p, std::string::npos);
          break;
        }
        out += repl;
        ++done;
        if (p >= s.size()) {
          break;
        }
        size_t q = p;
        NextCodePoint(s, &q);
        out.append(s, p, q - p);
        p = q;
        if (out.size() > kMaxStringBytes) {
          return TooLarge();
        }
      }
    } else {
      size_t start = 0;
      while (count < 0 || done < count) {
        size_t hit = s.find(old, start);
        if (hit == std::string::npos) {
          break;
        }
        out.append(s, start, hit - start);
        out += repl;
        start = hit + old.size();
        ++done;
        if (out.size() > kMaxStringBytes) {
          return TooLarge();
        }
      }
      out.append(s, start, std::string::npos);
    }
    return NewString(std::move(out));
  }

  // str.format with "{}", "{0}" and "{name}" fields (no format specs or conversions).
  absl::StatusOr<Value> FormatString(const std::string& s, const Args& args) {
    std::string out;
    size_t auto_index = 0;
    for (size_t p = 0; p < s.size(); ++p) {
      char c = s[p];
      if (c == '}') {
        if (p + 1 < s.size() && s[p + 1] == '}') {
          out.push_back('}');
          ++p;
          continue;
        }
        return TypeError("Single '}' encountered in format string");
      }
      if (c != '{') {
        out.push_back(c);
        continue;
      }
      if (p + 1 < s.size() && s[p + 1] == '{') {
        out.push_back('{');
        ++p;
        continue;
      }
      size_t close = s.find('}', p);
      if (close == std::string::npos) {
        return TypeError("Single '{' encountered in format string");
      }
      std::string field = s.substr(p + 1, close - p - 1);
      if (field.find_first_of(":!.[") != std::string::npos) {
        return TypeError("unsupported construct: format specs in str.format()");
      }
      const Value* v = nullptr;
      if (field.empty()) {
        if (auto_index < args.pos.size()) {
          v = &args.pos[auto_index++];
        }
      } else if (IsDigit(field[0])) {
        size_t idx = 0;
        auto res = std::from_chars(field.data(), field.data() + field.size(), idx);
        if (res.ec == std::errc() && idx < args.pos.size()) {
          v = &args.pos[idx];
        }
      } else {
        for (const auto& [k, val] : args.kw) {
          if (k == field) {
            v = &val;
          }
        }
      }
      if (v == nullptr) {
        return TypeError(absl::StrCat("str.format(): no argument for field ", Quote(field)));
      }
      CT_RETURN_IF_ERROR(AppendStr(*v, &out));
      if (out.size() > kMaxStringBytes) {
        return TooLarge();
      }
      p = close;
    }
    return NewString(std::move(out));
  }

  // Code-point index of a byte offset.
  static int64_t CharIndex(const std::string& s, size_t byte) {
    return static_cast<int64_t>(CodePointCount(std::string_view(s).substr(0, byte)));
  }

  absl::StatusOr<Value> CallMethod(const Value& obj, const std::string& name, const Args& args) {
    Params p;
    if (obj.is(Type::kString)) {
      const std::string& s = obj.str();
      if (name == "strip" || name == "lstrip" || name == "rstrip") {
        CT_RETURN_IF_ERROR(Bind(name, args, {"chars"}, &p));
        CT_ASSIGN_OR_RETURN(std::optional<std::string> chars, OptionalString(p[0], name));
        return NewString(std::string(PyStrip(s, name != "rstrip", name != "lstrip", chars)));
      }
      if (name == "startswith" || name == "endswith") {
        CT_RETURN_IF_ERROR(Bind(name, args, {"prefix"}, &p));
        std::vector<Value> candidates;
        if (p[0] && p[0]->is(Type::kList) && p[0]->list().is_tuple) {
          candidates = p[0]->list().items;
        } else if (p[0]) {
          candidates.push_back(*p[0]);
        }
        if (candidates.empty() && !p[0]) {
          return TypeError(absl::StrCat(name, "() takes at least 1 argument (0 given)"));
        }
        for (const auto& c : candidates) {
          if (!c.is(Type::kString)) {
            return TypeError(
                absl::StrCat(name, " first arg must be str or a tuple of str, not ", TypeName(c)));
          }
          const std::string& x = c.str();
          bool hit = x.size() <= s.size() &&
                     (name == "startswith" ? s.compare(0, x.size(), x) == 0
                                           : s.compare(s.size() - x.size(), x.size(), x) == 0);
          if (hit) {
            return Value::Bool(true);
          }
        }
        return Value::Bool(false);
      }
      if (name == "split" || name == "rsplit") {
        CT_RETURN_IF_ERROR(Bind(name, args, {"sep", "maxsplit"}, &p));
        return SplitString(s, p[0], p[1], name == "rsplit");
      }
      if (name == "splitlines") {
        CT_RETURN_IF_ERROR(Bind(name, args, {"keepends"}, &p));
        return SplitLines(s, p[0] && Truthy(*p[0]));
      }
      if (name == "upper" || name == "lower" || name == "title" || name == "capitalize") {
        CT_RETURN_IF_ERROR(Bind(name, args, {}, &p));
        return NewString(name == "upper"   ? CaseMap(s, true)
                         : name == "lower" ? CaseMap(s, false)
                         : name == "title" ? PyTitle(s)
                                           : PyCapitalize(s));
      }
      if (name == "replace") {
        CT_RETURN_IF_ERROR(Bind(name, args, {"old", "new", "count"}, &p));
        if (!p[0] || !p[1] || !p[0]->is(Type::kString) || !p[1]->is(Type::kString)) {
          return TypeError("replace() arguments must be str");
        }
        int64_t count = p[2] && p[2]->IsIntLike() ? p[2]->i() : -1;
        return ReplaceString(s, p[0]->str(), p[1]->str(), count);
      }
      if (name == "find" || name == "rfind" || name == "index" || name == "rindex" ||
          name == "count") {
        CT_RETURN_IF_ERROR(Bind(name, args, {"sub"}, &p));
        if (!p[0] || !p[0]->is(Type::kString)) {
          return TypeError(absl::StrCat(name, "() argument must be str"));
        }
        const std::string& sub = p[0]->str();
        if (name == "count") {
          if (sub.empty()) {
            return Value::Int(static_cast<int64_t>(CodePointCount(s)) + 1);
          }
          int64_t n = 0;
          for (size_t at = s.find(sub); at != std::string::npos;
               at = s.find(sub, at + sub.size())) {
            ++n;
          }
          return Value::Int(n);
        }
        size_t at = (name == "find" || name == "index") ? s.find(sub) : s.rfind(sub);
        if (at == std::string::npos) {
          if (name == "index" || name == "rindex") {
            return TypeError("substring not found");
          }
          return Value::Int(-1);
        }
        return Value::Int(CharIndex(s, at));
      }
      if (name == "join") {
        CT_RETURN_IF_ERROR(Bind(name, args, {"iterable"}, &p));
        if (!p[0]) {
          return TypeError("join() takes exactly one argument (0 given)");
        }
        CT_ASSIGN_OR_RETURN(ListPtr items, Iterate(*p[0]));
        std::string out;
        for (size_t k = 0; k < items->items.size(); ++k) {
          const Value& item = items->items[k];
          if (!item.is(Type::kString)) {
            return TypeError(absl::StrCat("sequence item ", k, ": expected str instance, ",
                                          TypeName(item), " found"));
          }
          if (k > 0) {
            out += s;
          }
          out += item.str();
          if (out.size() > kMaxStringBytes) {
            return TooLarge();
          }
        }
        return NewString(std::move(out));
      }
      if (name == "format") {
        return FormatString(s, args);
      }
      if (name == "removeprefix" || name == "removesuffix") {
        CT_RETURN_IF_ERROR(Bind(name, args, {"affix"}, &p));
        if (!p[0] || !p[0]->is(Type::kString)) {
          return TypeError(absl::StrCat(name, "() argument must be str"));
        }
        const std::string& x = p[0]->str();
        if (name == "removeprefix" && s.compare(0, x.size(), x) == 0) {
          return NewString(s.substr(x.size()));
        }
        if (name == "removesuffix" && !x.empty() && x.size() <= s.size() &&
            s.compare(s.size() - x.size(), x.size(), x) == 0) {
          return NewString(s.substr(0, s.size() - x.size()));
        }
        return obj;
      }
      if (name.size() > 2 && name.compare(0, 2, "is") == 0) {
        CT_RETURN_IF_ERROR(Bind(name, args, {}, &p));
        return Value::Bool(StringPredicate(s, name));
      }
    } else if (obj.is(Type::kDict)) {
      const DictData& d = obj.dict();
      if (name == "get") {
        CT_RETURN_IF_ERROR(Bind(name, args, {"key", "default"}, &p));
        if (!p[0]) {
          return TypeError("get expected at least 1 argument, got 0");
        }
        if (const Value* v = d.Find(*p[0])) {
          return *v;
        }
        return p[1] ? *p[1] : Value::MakeNone();
      }
      CT_RETURN_IF_ERROR(Bind(name, args, {}, &p));
      std::vector<Value> items;
      items.reserve(d.entries.size());
      for (const auto& [k, v] : d.entries) {
        if (name == "keys") {
          items.push_back(k);
        } else if (name == "values") {
          items.push_back(v);
        } else {
          items.push_back(Value::List({k, v}, true));
        }
      }
      return NewList(std::move(items));
    } else if (obj.is(Type::kList)) {
      CT_RETURN_IF_ERROR(Bind(name, args, {"value"}, &p));
      if (!p[0]) {
        return TypeError(absl::StrCat(name, "() takes exactly one argument (0 given)"));
      }
      const auto& items = obj.list().items;
      CT_RETURN_IF_ERROR(Step(static_cast<int64_t>(items.size())));
      int64_t n = 0;
      for (size_t k = 0; k < items.size(); ++k) {
        if (Equal(items[k], *p[0])) {
          if (name == "index") {
            return Value::Int(static_cast<int64_t>(k));
          }
          ++n;
        }
      }
      if (name == "index") {
        return TypeError("value is not in list");
      }
      return Value::Int(n);
    } else if (obj.is(Type::kLoop)) {
      if (name == "cycle") {
        if (args.pos.empty()) {
          return TypeError("no items for cycling given");
        }
        return args.pos[static_cast<size_t>(obj.loop().index0) % args.pos.size()];
      }
      return TypeError("unsupported construct: loop.changed()");
    }
    return TypeError(absl::StrCat(Quote(TypeName(obj)), " object has no method ", Quote(name)));
  }

  static bool StringPredicate(const std::string& s, const std::string& name) {
    if (s.empty()) {
      return false;
    }
    if (name == "isupper" || name == "islower") {
      bool has_cased = false;
      size_t p = 0;
      while (p < s.size()) {
        char32_t c = NextCodePoint(s, &p);
        if (IsCased(c)) {
          has_cased = true;
          bool wrong = name == "isupper" ? u_islower(static_cast<UChar32>(c))
                                         : u_isupper(static_cast<UChar32>(c));
          if (wrong) {
            return false;
          }
        }
      }
      return has_cased;
    }
    size_t p = 0;
    while (p < s.size()) {
      auto c = static_cast<UChar32>(NextCodePoint(s, &p));
      bool ok = name == "isdigit"   ? u_isdigit(c)
                : name == "isalpha" ? u_isalpha(c)
                : name == "isalnum" ? (u_isalpha(c) || u_isdigit(c))
                : name == "isspace" ? IsPySpace(static_cast<char32_t>(c))
                                    : false;
      if (!ok) {
        return false;
      }
    }
    return true;
  }

  // Python's str.splitlines.
  absl::StatusOr<Value> SplitLines(const std::string& s, bool keepends) {
    std::vector<Value> lines;
    size_t start = 0;
    size_t p = 0;
    while (p < s.size()) {
      size_t q = p;
      char32_t c = NextCodePoint(s, &q);
      bool brk = c == '\n' || c == '\r' || c == 0x0B || c == 0x0C || c == 0x1C || c == 0x1D ||
                 c == 0x1E || c == 0x85 || c == 0x2028 || c == 0x2029;
      if (!brk) {
        p = q;
        continue;
      }
      if (c == '\r' && q < s.size() && s[q] == '\n') {
        ++q;
      }
      lines.push_back(Value::String(s.substr(start, (keepends ? q : p) - start)));
      start = q;
      p = q;
    }
    if (start < s.size()) {
      lines.push_back(Value::String(s.substr(start)));
    }
    return NewList(std::move(lines));
  }

  // ---- filters

  absl::StatusOr<std::vector<Value>> Sorted(std::vector<Value> items, bool case_sensitive,
                                            const std::optional<Value>& attribute) {
    std::vector<std::pair<Value, Value>> keyed;  // (key, item)
    for (auto& item : items) {
      Value key = item;
      if (!IsNoneOrMissing(attribute)) {
        CT_ASSIGN_OR_RETURN(key, GetPath(item, *attribute));
      }
      if (!case_sensitive && key.is(Type::kString)) {
        key = Value::String(CaseMap(key.str(), false));
      }
      keyed.emplace_back(std::move(key), std::move(item));
    }
    CT_RETURN_IF_ERROR(Step(static_cast<int64_t>(keyed.size()) * 20));
    absl::Status error;
    std::stable_sort(keyed.begin(), keyed.end(), [&](const auto& a, const auto& b) {
      if (!error.ok()) {
        return false;
      }
      auto c = Order(a.first, b.first, "<");
      if (!c.ok()) {
        error = c.status();
        return false;
      }
      return *c < 0;
    });
    CT_RETURN_IF_ERROR(error);
    std::vector<Value> out;
    out.reserve(keyed.size());
    for (auto& [k, v] : keyed) {
      out.push_back(std::move(v));
    }
    return out;
  }

  absl::StatusOr<Value> ToInt(const Value& v, const Value& dflt, int base) {
    if (v.IsIntLike()) {
      return Value::Int(v.i());
    }
    if (v.is(Type::kFloat)) {
      double d = v.f();
      if (!std::isfinite(d) || std::fabs(d) >= 9.2e18) {
        return TypeError("cannot convert float to integer");
      }
      return Value::Int(static_cast<int64_t>(d));
    }
    if (v.is(Type::kString)) {
      std::string t(PyStrip(v.str(), true, true, std::nullopt));
      std::string digits;
      for (char c : t) {
        if (c != '_') {
          digits.push_back(c);
        }
      }
      size_t at = digits.empty() || (digits[0] != '+' && digits[0] != '-') ? 0 : 1;
      // Python accepts the matching literal prefix: int('0x1A', 16).
      if (digits.size() > at + 2 && digits[at] == '0') {
        char prefix = static_cast<char>(std::tolower(static_cast<unsigned char>(digits[at + 1])));
        if ((base == 16 && prefix == 'x') || (base == 8 && prefix == 'o') ||
            (base == 2 && prefix == 'b')) {
          at += 2;
        }
      }
      int64_t r = 0;
      auto res = std::from_chars(digits.data() + at, digits.data() + digits.size(), r, base);
      if (at < digits.size() && res.ec == std::errc() && res.ptr == digits.data() + digits.size() &&
          digits.find("__") == std::string::npos) {
        return Value::Int(digits[0] == '-' ? -r : r);
      }
      auto f = ParseFloat(v.str());
      if (f && std::isfinite(*f) && std::fabs(*f) < 9.2e18) {
        return Value::Int(static_cast<int64_t>(*f));
      }
    }
    return dflt;
  }

  // Python's float(str): decimal literals, inf and nan, surrounding whitespace allowed.
  static std::optional<double> ParseFloat(std::string_view s) {
    std::string t(PyStrip(s, true, true, std::nullopt));
    std::string lower = CaseMap(t, false);
    size_t sign = !lower.empty() && (lower[0] == '+' || lower[0] == '-') ? 1 : 0;
    std::string_view body = std::string_view(lower).substr(sign);
    double r = 0;
    if (body == "inf" || body == "infinity") {
      r = std::numeric_limits<double>::infinity();
    } else if (body == "nan") {
      r = std::numeric_limits<double>::quiet_NaN();
    } else {
      if (body.empty() || body.find_first_not_of("0123456789.e+-_") != std::string_view::npos) {
        return std::nullopt;
      }
      std::string clean;
      for (char c : body) {
        if (c != '_') {
          clean.push_back(c);
        }
      }
      auto res = std::from_chars(clean.data(), clean.data() + clean.size(), r);
      if (res.ec != std::errc() || res.ptr != clean.data() + clean.size()) {
        return std::nullopt;
      }
    }
    return sign == 1 && lower[0] == '-' ? -r : r;
  }

  absl::StatusOr<Value> ApplyFilter(const std::string& name, const Value& v, const Args& args) {
    Params p;
    if (name == "trim") {
      CT_RETURN_IF_ERROR(Bind(name, args, {"chars"}, &p));
      CT_ASSIGN_OR_RETURN(std::optional<std::string> chars, OptionalString(p[0], name));
      CT_ASSIGN_OR_RETURN(std::string s, ToStr(v));
      return NewString(std::string(PyStrip(s, true, true, chars)));
    }
    if (name == "upper" || name == "lower" || name == "capitalize" || name == "title") {
      CT_RETURN_IF_ERROR(Bind(name, args, {}, &p));
      CT_ASSIGN_OR_RETURN(std::string s, ToStr(v));
      return NewString(name == "upper"   ? CaseMap(s, true)
                       : name == "lower" ? CaseMap(s, false)
                       : name == "title" ? JinjaTitle(s)
                                         : PyCapitalize(s));
    }
    if (name == "string" || name == "safe") {
      CT_RETURN_IF_ERROR(Bind(name, args, {}, &p));
      if (name == "safe" && !v.IsUndefined()) {
        return v;
      }
      CT_ASSIGN_OR_RETURN(std::string s, ToStr(v));
      return NewString(std::move(s));
    }
    if (name == "e" || name == "escape") {
      CT_RETURN_IF_ERROR(Bind(name, args, {}, &p));
      CT_ASSIGN_OR_RETURN(std::string s, ToStr(v));
      std::string out;
      for (char c : s) {
        switch (c) {
          case '&':
            out += "&amp;";
            break;
          case '<':
            out += "&lt;";
            break;
          case '>':
            out += "&gt;";
            break;
          case '"':
            out += "&#34;";
            break;
          case '\'':
            out += "&#39;";
            break;
          default:
            out.push_back(c);
        }
      }
      return NewString(std::move(out));
    }
    if (name == "length" || name == "count") {
      CT_RETURN_IF_ERROR(Bind(name, args, {}, &p));
      CT_ASSIGN_OR_RETURN(int64_t n, Length(v));
      return Value::Int(n);
    }
    if (name == "tojson") {
      CT_RETURN_IF_ERROR(
          Bind(name, args, {"ensure_ascii", "indent", "separators", "sort_keys"}, &p));
      JsonOptions opt;
      opt.ensure_ascii = p[0] && Truthy(*p[0]);
      if (!IsNoneOrMissing(p[1])) {
        if (p[1]->IsIntLike()) {
          opt.indent = std::string(static_cast<size_t>(std::clamp<int64_t>(p[1]->i(), 0, 64)), ' ');
        } else if (p[1]->is(Type::kString)) {
          opt.indent = p[1]->str();
        } else {
          return TypeError("tojson: indent must be an int or a str");
        }
        opt.item_separator = ",";
      }
      if (!IsNoneOrMissing(p[2])) {
        if (!p[2]->is(Type::kList) || p[2]->list().items.size() != 2 ||
            !p[2]->list().items[0].is(Type::kString) || !p[2]->list().items[1].is(Type::kString)) {
          return TypeError("tojson: separators must be a pair of strings");
        }
        opt.item_separator = p[2]->list().items[0].str();
        opt.key_separator = p[2]->list().items[1].str();
      }
      opt.sort_keys = p[3] && Truthy(*p[3]);
      std::string out;
      CT_RETURN_IF_ERROR(AppendJson(v, opt, 0, &out));
      return NewString(std::move(out));
    }
    if (name == "default" || name == "d") {
      CT_RETURN_IF_ERROR(Bind(name, args, {"default_value", "boolean"}, &p));
      bool boolean = p[1] && Truthy(*p[1]);
      if (v.IsUndefined() || (boolean && !Truthy(v))) {
        return p[0] ? *p[0] : Value::String("");
      }
      return v;
    }
    if (name == "join") {
      CT_RETURN_IF_ERROR(Bind(name, args, {"d", "attribute"}, &p));
      std::string sep;
      if (p[0]) {
        CT_ASSIGN_OR_RETURN(sep, ToStr(*p[0]));
      }
      CT_ASSIGN_OR_RETURN(ListPtr items, Iterate(v));
      std::string out;
      for (size_t k = 0; k < items->items.size(); ++k) {
        Value item = items->items[k];
        if (!IsNoneOrMissing(p[1])) {
          CT_ASSIGN_OR_RETURN(item, GetPath(item, *p[1]));
        }
        if (k > 0) {
          out += sep;
        }
        CT_RETURN_IF_ERROR(AppendStr(item, &out));
        if (out.size() > kMaxStringBytes) {
          return TooLarge();
        }
      }
      return NewString(std::move(out));
    }
    if (name == "first" || name == "last") {
      CT_RETURN_IF_ERROR(Bind(name, args, {}, &p));
      if (v.is(Type::kString) && name == "last") {
        CT_ASSIGN_OR_RETURN(ListPtr chars, Iterate(v));
        if (!chars->items.empty()) {
          return chars->items.back();
        }
      } else {
        CT_ASSIGN_OR_RETURN(ListPtr items, Iterate(v));
        if (!items->items.empty()) {
          return name == "first" ? items->items.front() : items->items.back();
        }
      }
      return Value::MakeUndefined(absl::StrCat("No ", name, " item, sequence was empty."));
    }
    if (name == "list") {
      CT_RETURN_IF_ERROR(Bind(name, args, {}, &p));
      CT_ASSIGN_OR_RETURN(ListPtr items, Iterate(v));
      return NewList(items->items);
    }
    if (name == "reverse") {
      CT_RETURN_IF_ERROR(Bind(name, args, {}, &p));
      if (v.is(Type::kString)) {
        CT_ASSIGN_OR_RETURN(ListPtr chars, Iterate(v));
        std::string out;
        for (auto it = chars->items.rbegin(); it != chars->items.rend(); ++it) {
          out += it->str();
        }
        return NewString(std::move(out));
      }
      CT_ASSIGN_OR_RETURN(ListPtr items, Iterate(v));
      return NewList(std::vector<Value>(items->items.rbegin(), items->items.rend()));
    }
    if (name == "items") {
      CT_RETURN_IF_ERROR(Bind(name, args, {}, &p));
      if (v.IsUndefined()) {
        return NewList({});
      }
      if (!v.is(Type::kDict)) {
        return TypeError("items: can only get item pairs from a mapping");
      }
      return CallMethod(v, "items", Args());
    }
    if (name == "replace") {
      CT_RETURN_IF_ERROR(Bind(name, args, {"old", "new", "count"}, &p));
      CT_ASSIGN_OR_RETURN(std::string s, ToStr(v));
      std::string old_s;
      std::string new_s;
      if (p[0]) {
        CT_ASSIGN_OR_RETURN(old_s, ToStr(*p[0]));
      }
      if (p[1]) {
        CT_ASSIGN_OR_RETURN(new_s, ToStr(*p[1]));
      }
      if (!p[0] || !p[1]) {
        return TypeError("replace() needs the old and new strings");
      }
      int64_t count = p[2] && p[2]->IsIntLike() ? p[2]->i() : -1;
      return ReplaceString(s, old_s, new_s, count);
    }
    if (name == "int") {
      CT_RETURN_IF_ERROR(Bind(name, args, {"default", "base"}, &p));
      int base = p[1] && p[1]->IsIntLike() ? static_cast<int>(p[1]->i()) : 10;
      if (base < 2 || base > 36) {
        base = 10;
      }
      return ToInt(v, p[0] ? *p[0] : Value::Int(0), base);
    }
    if (name == "float") {
      CT_RETURN_IF_ERROR(Bind(name, args, {"default"}, &p));
      if (v.IsNumber()) {
        return Value::Float(v.f());
      }
      if (v.is(Type::kString)) {
        if (auto f = ParseFloat(v.str())) {
          return Value::Float(*f);
        }
      }
      return p[0] ? *p[0] : Value::Float(0.0);
    }
    if (name == "abs") {
      CT_RETURN_IF_ERROR(Bind(name, args, {}, &p));
      if (v.IsIntLike()) {
        if (v.i() == std::numeric_limits<int64_t>::min()) {
          return TypeError("integer overflow");
        }
        return Value::Int(v.i() < 0 ? -v.i() : v.i());
      }
      if (v.is(Type::kFloat)) {
        return Value::Float(std::fabs(v.f()));
      }
      return TypeError(absl::StrCat("bad operand type for abs(): ", Quote(TypeName(v))));
    }
    if (name == "round") {
      CT_RETURN_IF_ERROR(Bind(name, args, {"precision", "method"}, &p));
      if (!v.IsNumber()) {
        return TypeError(absl::StrCat("round: ", Quote(TypeName(v)), " is not a number"));
      }
      int64_t precision = p[0] && p[0]->IsIntLike() ? std::clamp<int64_t>(p[0]->i(), -300, 300) : 0;
      std::string method = p[1] && p[1]->is(Type::kString) ? p[1]->str() : "common";
      if (method == "common" && v.IsIntLike()) {
        return Value::Int(v.i());
      }
      if (method == "common" && precision >= 0 && std::isfinite(v.f())) {
        // Python rounds the exact binary value half-to-even, as printf's correctly rounded
        // conversion does: round(2.675, 2) is 2.67.
        char buf[400];
        std::snprintf(buf, sizeof(buf), "%.*f", static_cast<int>(std::min<int64_t>(precision, 60)),
                      v.f());
        double r = 0;
        std::from_chars(buf, buf + std::strlen(buf), r);
        return Value::Float(r);
      }
      double scale = std::pow(10.0, static_cast<double>(precision));
      double x = v.f() * scale;
      if (method == "common") {
        x = std::nearbyint(x);
      } else if (method == "ceil") {
        x = std::ceil(x);
      } else if (method == "floor") {
        x = std::floor(x);
      } else {
        return TypeError("round: method must be common, ceil or floor");
      }
      return Value::Float(x / scale);
    }
    if (name == "indent") {
      CT_RETURN_IF_ERROR(Bind(name, args, {"width", "first", "blank"}, &p));
      std::string indent(4, ' ');
      if (p[0] && p[0]->is(Type::kString)) {
        indent = p[0]->str();
      } else if (p[0] && p[0]->IsIntLike()) {
        indent.assign(static_cast<size_t>(std::clamp<int64_t>(p[0]->i(), 0, 256)), ' ');
      }
      bool first = p[1] && Truthy(*p[1]);
      bool blank = p[2] && Truthy(*p[2]);
      if (!v.is(Type::kString)) {  // jinja2 appends "\n" to the value itself
        return TypeError(absl::StrCat("indent: expected a string, got ", Quote(TypeName(v))));
      }
      std::string s = v.str();
      s += "\n";  // jinja2's quirk, so that splitlines keeps a trailing empty line
      CT_ASSIGN_OR_RETURN(Value lines_v, SplitLines(s, false));
      const auto& lines = lines_v.list().items;
      std::string out;
      for (size_t k = 0; k < lines.size(); ++k) {
        const std::string& line = lines[k].str();
        if (k > 0) {
          out += "\n";
          if (blank || !line.empty()) {
            out += indent;
          }
        }
        out += line;
        if (out.size() > kMaxStringBytes) {
          return TooLarge();
        }
      }
      if (first) {
        out = indent + out;
      }
      return NewString(std::move(out));
    }
    if (name == "attr") {
      CT_RETURN_IF_ERROR(Bind(name, args, {"name"}, &p));
      if (!p[0] || !p[0]->is(Type::kString)) {
        return TypeError("attr: the attribute name must be a string");
      }
      if (v.is(Type::kDict) && !HasMethod(v, p[0]->str())) {
        return NoAttribute(v, p[0]->str());  // attr() does not look at dict keys
      }
      return GetAttr(v, p[0]->str());
    }
    if (name == "map") {
      CT_ASSIGN_OR_RETURN(ListPtr items, Iterate(v));
      std::vector<Value> out;
      if (args.pos.empty()) {
        const Value* attribute = nullptr;
        const Value* dflt = nullptr;
        for (const auto& [k, val] : args.kw) {
          if (k == "attribute") {
            attribute = &val;
          } else if (k == "default") {
            dflt = &val;
          } else {
            return TypeError(absl::StrCat("map: unexpected keyword argument ", Quote(k)));
          }
        }
        if (attribute == nullptr) {
          return TypeError("map: a filter name or attribute= is required");
        }
        for (const auto& item : items->items) {
          CT_ASSIGN_OR_RETURN(Value x, GetPath(item, *attribute));
          out.push_back(x.IsUndefined() && dflt != nullptr ? *dflt : x);
        }
      } else {
        if (!args.pos[0].is(Type::kString) || !Contains(kFilters, args.pos[0].str())) {
          return TypeError("map: unknown filter name");
        }
        Args rest;
        rest.pos.assign(args.pos.begin() + 1, args.pos.end());
        rest.kw = args.kw;
        for (const auto& item : items->items) {
          CT_ASSIGN_OR_RETURN(Value x, ApplyFilter(args.pos[0].str(), item, rest));
          out.push_back(std::move(x));
        }
      }
      return NewList(std::move(out));
    }
    if (name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr") {
      const bool by_attr = name == "selectattr" || name == "rejectattr";
      const bool keep_when = name == "select" || name == "selectattr";
      if (!args.kw.empty()) {
        return TypeError(absl::StrCat(name, ": keyword arguments are not supported"));
      }
      size_t at = 0;
      std::optional<Value> attribute;
      if (by_attr) {
        if (args.pos.empty()) {
          return TypeError(absl::StrCat(name, ": missing attribute"));
        }
        attribute = args.pos[at++];
      }
      std::optional<std::string> test;
      if (at < args.pos.size()) {
        if (!args.pos[at].is(Type::kString) || !Contains(kTests, args.pos[at].str())) {
          return TypeError(absl::StrCat(name, ": unknown test name"));
        }
        test = args.pos[at++].str();
      }
      Args test_args;
      test_args.pos.assign(args.pos.begin() + static_cast<std::ptrdiff_t>(at), args.pos.end());
      CT_ASSIGN_OR_RETURN(ListPtr items, Iterate(v));
      std::vector<Value> out;
      for (const auto& item : items->items) {
        Value x = item;
        if (attribute) {
          CT_ASSIGN_OR_RETURN(x, GetPath(item, *attribute));
        }
        bool r = Truthy(x);
        if (test) {
          CT_ASSIGN_OR_RETURN(r, ApplyTest(*test, x, test_args));
        }
        if (r == keep_when) {
          out.push_back(item);
        }
      }
      return NewList(std::move(out));
    }
    if (name == "unique") {
      CT_RETURN_IF_ERROR(Bind(name, args, {"case_sensitive", "attribute"}, &p));
      bool case_sensitive = p[0] && Truthy(*p[0]);
      CT_ASSIGN_OR_RETURN(ListPtr items, Iterate(v));
      std::vector<Value> out;
      std::vector<Value> seen;
      for (const auto& item : items->items) {
        Value key = item;
        if (!IsNoneOrMissing(p[1])) {
          CT_ASSIGN_OR_RETURN(key, GetPath(item, *p[1]));
        }
        if (!case_sensitive && key.is(Type::kString)) {
          key = Value::String(CaseMap(key.str(), false));
        }
        CT_RETURN_IF_ERROR(Step(static_cast<int64_t>(seen.size())));
        if (std::none_of(seen.begin(), seen.end(), [&](const Value& s) { return Equal(s, key); })) {
          seen.push_back(key);
          out.push_back(item);
        }
      }
      return NewList(std::move(out));
    }
    if (name == "sort") {
      CT_RETURN_IF_ERROR(Bind(name, args, {"reverse", "case_sensitive", "attribute"}, &p));
      CT_ASSIGN_OR_RETURN(ListPtr items, Iterate(v));
      CT_ASSIGN_OR_RETURN(std::vector<Value> sorted,
                          Sorted(items->items, p[1] && Truthy(*p[1]), p[2]));
      if (p[0] && Truthy(*p[0])) {
        std::reverse(sorted.begin(), sorted.end());
      }
      return NewList(std::move(sorted));
    }
    if (name == "min" || name == "max") {
      CT_RETURN_IF_ERROR(Bind(name, args, {"case_sensitive", "attribute"}, &p));
      CT_ASSIGN_OR_RETURN(ListPtr items, Iterate(v));
      if (items->items.empty()) {
        return Value::MakeUndefined("No aggregated item, sequence was empty.");
      }
      CT_ASSIGN_OR_RETURN(std::vector<Value> sorted,
                          Sorted(items->items, p[0] && Truthy(*p[0]), p[1]));
      return name == "min" ? sorted.front() : sorted.back();
    }
    if (name == "sum") {
      CT_RETURN_IF_ERROR(Bind(name, args, {"attribute", "start"}, &p));
      CT_ASSIGN_OR_RETURN(ListPtr items, Iterate(v));
      Value total = p[1] ? *p[1] : Value::Int(0);
      for (const auto& item : items->items) {
        Value x = item;
        if (!IsNoneOrMissing(p[0])) {
          CT_ASSIGN_OR_RETURN(x, GetPath(item, *p[0]));
        }
        CT_ASSIGN_OR_RETURN(total, BinaryOp("+", total, x));
      }
      return total;
    }
    return TypeError(absl::StrCat("unknown filter ", Quote(name)));
  }

  // ---- tests

  absl::StatusOr<bool> ApplyTest(const std::string& name, const Value& v, const Args& args) {
    Params p;
    auto arg = [&](std::string_view param) -> absl::StatusOr<Value> {
      CT_RETURN_IF_ERROR(Bind(name, args, {param}, &p));
      if (!p[0]) {
        return TypeError(absl::StrCat("test ", Quote(name), " needs an argument"));
      }
      return *p[0];
    };
    if (name == "defined" || name == "undefined") {
      CT_RETURN_IF_ERROR(Bind(name, args, {}, &p));
      return v.IsUndefined() == (name == "undefined");
    }
    if (name == "none") {
      return v.is(Type::kNone);
    }
    if (name == "boolean") {
      return v.is(Type::kBool);
    }
    if (name == "true" || name == "false") {
      return v.is(Type::kBool) && v.b() == (name == "true");
    }
    if (name == "integer") {
      return v.is(Type::kInt);
    }
    if (name == "float") {
      return v.is(Type::kFloat);
    }
    if (name == "number") {
      return v.IsNumber();
    }
    if (name == "string") {
      return v.is(Type::kString);
    }
    if (name == "mapping") {
      return v.is(Type::kDict);
    }
    if (name == "iterable" || name == "sequence") {
      return v.is(Type::kString) || v.is(Type::kList) || v.is(Type::kDict) || v.IsUndefined() ||
             (name == "iterable" && v.is(Type::kLoop));
    }
    if (name == "callable") {
      return v.is(Type::kCallable);
    }
    if (name == "lower" || name == "upper") {
      return v.is(Type::kString) && StringPredicate(v.str(), "is" + name);
    }
    if (name == "odd" || name == "even" || name == "divisibleby") {
      Value divisor = Value::Int(2);
      if (name == "divisibleby") {
        CT_ASSIGN_OR_RETURN(divisor, arg("num"));
      }
      CT_ASSIGN_OR_RETURN(Value r, BinaryOp("%", v, divisor));
      bool zero = r.IsNumber() && r.f() == 0;
      return name == "odd" ? !zero : zero;
    }
    if (name == "in") {
      CT_ASSIGN_OR_RETURN(Value seq, arg("seq"));
      return In(v, seq);
    }
    if (name == "sameas") {
      CT_ASSIGN_OR_RETURN(Value other, arg("other"));
      if (v.type() != other.type()) {
        return false;
      }
      switch (v.type()) {
        case Type::kString:
          return &v.str() == &other.str();
        case Type::kList:
          return v.list_ptr() == other.list_ptr();
        case Type::kDict:
          return &v.dict() == &other.dict();
        default:
          return Equal(v, other);
      }
    }
    static constexpr std::pair<std::string_view, std::string_view> kComparisons[] = {
        {"eq", "=="}, {"equalto", "=="},    {"==", "=="}, {"ne", "!="}, {"!=", "!="},
        {"lt", "<"},  {"lessthan", "<"},    {"<", "<"},   {"le", "<="}, {"<=", "<="},
        {"gt", ">"},  {"greaterthan", ">"}, {">", ">"},   {"ge", ">="}, {">=", ">="}};
    for (const auto& [test, op] : kComparisons) {
      if (name == test) {
        CT_ASSIGN_OR_RETURN(Value other, arg("other"));
        return CompareOp(op, v, other);
      }
    }
    return TypeError(absl::StrCat("unknown test ", Quote(name)));
  }

  std::unordered_map<std::string, Value> context_;
  std::string* out_ = nullptr;
  Value block_value_;
  int64_t steps_ = 0;
  int call_depth_ = 0;
  bool raised_ = false;
};

// jinja2 normalises newlines and, without keep_trailing_newline, drops one final newline.
std::string NormalizeSource(std::string_view source) {
  std::string out;
  out.reserve(source.size());
  for (size_t k = 0; k < source.size(); ++k) {
    if (source[k] == '\r') {
      out.push_back('\n');
      if (k + 1 < source.size() && source[k + 1] == '\n') {
        ++k;
      }
    } else {
      out.push_back(source[k]);
    }
  }
  if (!out.empty() && out.back() == '\n') {
    out.pop_back();
  }
  return out;
}

template <typename Json>
absl::StatusOr<std::string> RenderProgram(const Program& program, const Json& context) {
  if (!context.is_object()) {
    return absl::InvalidArgumentError("chat template context must be a JSON object");
  }
  std::unordered_map<std::string, Value> vars;
  for (auto it = context.begin(); it != context.end(); ++it) {
    CT_ASSIGN_OR_RETURN(Value v, FromJson(it.value(), 1));
    vars[it.key()] = std::move(v);
  }
  Renderer renderer(std::move(vars));
  return renderer.Run(program);
}

}  // namespace
}  // namespace chat_template_internal

absl::StatusOr<ChatTemplate> ChatTemplate::Parse(std::string_view source) {
  namespace ct = chat_template_internal;
  auto program = std::make_shared<ct::Program>();
  program->source = ct::NormalizeSource(source);
  ct::SourceMap map(program->source);
  std::vector<ct::Token> tokens;
  CT_RETURN_IF_ERROR(ct::Lexer(program->source, map).Run(&tokens));
  ct::Parser parser(tokens, map);
  CT_RETURN_IF_ERROR(parser.ParseTemplate(&program->body));
  return ChatTemplate(std::move(program));
}

absl::StatusOr<std::string> ChatTemplate::Render(const nlohmann::json& context) const {
  return chat_template_internal::RenderProgram(*program_, context);
}

absl::StatusOr<std::string> ChatTemplate::Render(const nlohmann::ordered_json& context) const {
  return chat_template_internal::RenderProgram(*program_, context);
}

ChatTemplate::ChatTemplate(std::shared_ptr<const chat_template_internal::Program> program)
    : program_(std::move(program)) {}
ChatTemplate::ChatTemplate(ChatTemplate&&) noexcept = default;
ChatTemplate& ChatTemplate::operator=(ChatTemplate&&) noexcept = default;
ChatTemplate::~ChatTemplate() = default;

absl::StatusOr<std::string> ChatTemplateFromTokenizerConfig(const nlohmann::json& config) {
  if (!config.is_object()) {
    return absl::InvalidArgumentError("tokenizer_config.json must be a JSON object");
  }
  auto it = config.find("chat_template");
  if (it == config.end() || it->is_null()) {
    return absl::NotFoundError("tokenizer_config.json has no chat_template");
  }
  if (it->is_string()) {
    return it->get<std::string>();
  }
  if (!it->is_array()) {
    return absl::InvalidArgumentError(
        "tokenizer_config.json: chat_template must be a string or a list of {name, template}");
  }
  for (const auto& entry : *it) {
    if (!entry.is_object()) {
      return absl::InvalidArgumentError(
          "tokenizer_config.json: chat_template entries must be {name, template} objects");
    }
    auto name = entry.find("name");
    auto tmpl = entry.find("template");
    if (name != entry.end() && name->is_string() &&
        name->get_ref<const std::string&>() == "default") {
      if (tmpl == entry.end() || !tmpl->is_string()) {
        return absl::InvalidArgumentError(
            "tokenizer_config.json: the default chat_template entry has no template string");
      }
      return tmpl->get<std::string>();
    }
  }
  return absl::NotFoundError("tokenizer_config.json has no chat_template named \"default\"");
}

}  // namespace tandem
