//! Safe, self-contained reader for PyTorch `.pth` checkpoints written by
//! `torch.save(module.state_dict())` (the zip-based format, pickle protocol 2).
//!
//! The reader never executes anything: it runs its own minimal pickle interpreter that only
//! knows the handful of opcodes and the four kinds of globals such files use
//! (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`,
//! `torch._utils._rebuild_parameter` and the `torch.*Storage` dtype markers). Anything else is
//! rejected with an error that names the offending global.
//!
//! Every read is bounds-checked, every count is capped and every allocation is bounded by
//! the size of the input, so arbitrary (malicious or corrupt) bytes give an `Err`, never a
//! panic, a hang or a huge allocation.
//!
//! # Container layout (`torch.save`, `_use_new_zipfile_serialization=True`)
//!
//! A zip archive (entries stored, not compressed) whose records all live under one top folder
//! `<stem>/` (the stem need not match the file name):
//! `<stem>/data.pkl` (the pickle), `<stem>/data/<key>` (raw little-endian bytes of one storage
//! each), `<stem>/byteorder` (`little`; absent in very old files), `<stem>/version`, and
//! optionally `<stem>/.format_version`, `<stem>/.storage_alignment`,
//! `<stem>/.data/serialization_id`.
//!
//! Tensors may share a storage and may be non-contiguous views of it (e.g. tied weights saved
//! as a transposed view, stride `(1, n)`), possibly with a storage offset. [`PthTensor::data`]
//! is always materialised contiguous, row-major.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::{Read, Seek};
use std::path::Path;
use std::rc::Rc;

/// One tensor of a state dict, materialised as a contiguous row-major `f32` buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct PthTensor {
    /// State-dict key, e.g. `_components.linear1.V`.
    pub name: String,
    /// Tensor shape (empty for a 0-d tensor).
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values in row-major (C) order.
    pub data: Vec<f32>,
}

/// Error of [`read_pth`] / [`read_pth_bytes`]. Its `Display` is a single line
/// `<file>: <problem>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {}", one_line(.file), one_line(.kind))]
pub struct PthError {
    /// The file (path or caller-supplied name) the error is about.
    pub file: String,
    /// What went wrong.
    pub kind: PthErrorKind,
}

/// The problem behind a [`PthError`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PthErrorKind {
    #[error("cannot read file: {0}")]
    Io(String),
    #[error("not a zip archive ({0})")]
    NotZip(String),
    #[error("cannot read zip record {record}: {msg}")]
    ZipRecord { record: String, msg: String },
    #[error("no <name>/data.pkl record in the archive (not a torch.save checkpoint)")]
    MissingDataPkl,
    #[error("more than one data.pkl record ({0} and {1})")]
    MultipleDataPkl(String, String),
    #[error("unsupported byte order {0:?} (only \"little\" is supported)")]
    ByteOrder(String),
    #[error("missing storage record {0}")]
    MissingStorage(String),
    #[error("truncated storage {record} (needs {needs} bytes, has {has})")]
    TruncatedStorage {
        record: String,
        needs: u64,
        has: u64,
    },
    #[error("malformed pickle at byte {pos}: {msg}")]
    Pickle { pos: usize, msg: String },
    #[error("unsupported pickle opcode 0x{op:02x} at byte {pos}")]
    UnsupportedOpcode { op: u8, pos: usize },
    #[error(
        "pickle references disallowed global '{0}' (only tensors and ordered dicts are accepted)"
    )]
    DisallowedGlobal(String),
    #[error("unsupported tensor dtype {0}")]
    UnsupportedDtype(String),
    #[error("top-level object is {0}, expected a dict of tensors")]
    NotADict(String),
    #[error("entry {key}: {msg}")]
    BadEntry { key: String, msg: String },
    #[error("tensor {name}: {msg}")]
    BadTensor { name: String, msg: String },
    #[error("limit exceeded: {0}")]
    Limit(String),
}

/// Largest number of elements accepted for one tensor (and for one storage).
pub const MAX_TENSOR_ELEMENTS: u64 = 1 << 31;
/// Largest `data.pkl` accepted (a state dict with 100k tensors needs a few MiB).
pub const MAX_PICKLE_BYTES: u64 = 64 << 20;
/// Largest number of dimensions accepted for one tensor.
pub const MAX_NDIM: usize = 64;
const MAX_STACK: usize = 1 << 20;
const MAX_MARKS: usize = 1 << 16;
const MAX_MEMO: usize = 1 << 22;
const MAX_OBJECTS: usize = 1 << 22;
/// Materialised output (sum of all tensors' numel) may exceed the storage data actually present
/// in the file by at most this factor (tied weights make it > 1), plus [`OUTPUT_SLACK`].
const OUTPUT_AMPLIFICATION: u64 = 8;
const OUTPUT_SLACK: u64 = 1 << 20;
/// Longest string from the file quoted in an error message.
const MAX_QUOTED: usize = 120;

/// Reads all tensors of a `.pth` state dict, in file (insertion) order.
pub fn read_pth(path: &Path) -> Result<Vec<PthTensor>, PthError> {
    let what = path.display().to_string();
    let err = |kind| PthError {
        file: what.clone(),
        kind,
    };
    let file = std::fs::File::open(path).map_err(|e| err(PthErrorKind::Io(e.to_string())))?;
    let len = file
        .metadata()
        .map_err(|e| err(PthErrorKind::Io(e.to_string())))?
        .len();
    read_archive(std::io::BufReader::new(file), len).map_err(err)
}

/// Like [`read_pth`] for an in-memory file; `what` names the source in error messages.
pub fn read_pth_bytes(bytes: &[u8], what: &str) -> Result<Vec<PthTensor>, PthError> {
    read_archive(std::io::Cursor::new(bytes), bytes.len() as u64).map_err(|kind| PthError {
        file: what.to_string(),
        kind,
    })
}

// ---------------------------------------------------------------------------------------------
// Error helpers
// ---------------------------------------------------------------------------------------------

/// Renders `d` on one line: control characters (newlines included) are escaped.
fn one_line(d: &dyn fmt::Display) -> String {
    let s = d.to_string();
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Quotes a string taken from the file for an error message (escaped, length-limited).
fn quote(s: &str) -> String {
    let mut out = String::from("'");
    for (i, c) in s.chars().enumerate() {
        if i == MAX_QUOTED {
            out.push_str("...");
            break;
        }
        if c == '\'' || c == '\\' || c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

// ---------------------------------------------------------------------------------------------
// Zip container
// ---------------------------------------------------------------------------------------------

fn read_archive<R: Read + Seek>(reader: R, total_len: u64) -> Result<Vec<PthTensor>, PthErrorKind> {
    if total_len == 0 {
        return Err(PthErrorKind::NotZip("empty file".into()));
    }
    let mut zip = zip::ZipArchive::new(reader).map_err(|e| PthErrorKind::NotZip(e.to_string()))?;

    // Index the record names once (exact names; no fallback decoding).
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut pkl: Option<String> = None;
    for i in 0..zip.len() {
        let Some(Ok(name)) = zip.name_for_index(i) else {
            continue;
        };
        let name = name.into_owned();
        if let Some(stem) = name.strip_suffix("/data.pkl")
            && !stem.is_empty()
            && !stem.contains('/')
        {
            if let Some(first) = &pkl {
                return Err(PthErrorKind::MultipleDataPkl(quote(first), quote(&name)));
            }
            pkl = Some(name.clone());
        }
        names.entry(name).or_insert(i);
    }
    let pkl = pkl.ok_or(PthErrorKind::MissingDataPkl)?;
    let prefix = &pkl[..pkl.len() - "data.pkl".len()]; // "<stem>/"

    let mut read_record =
        |name: &str, limit: u64, allow_longer: bool| -> Result<Option<Vec<u8>>, PthErrorKind> {
            let Some(&index) = names.get(name) else {
                return Ok(None);
            };
            read_zip_record(&mut zip, index, name, limit, allow_longer, total_len).map(Some)
        };

    // Byte order: torch writes "little"; very old files have no record (native = little).
    let byteorder_name = format!("{prefix}byteorder");
    if let Some(bo) = read_record(&byteorder_name, 64, false)? {
        let text = String::from_utf8_lossy(&bo);
        if text.trim() != "little" {
            return Err(PthErrorKind::ByteOrder(quote(text.trim())));
        }
    }

    let pickle = read_record(&pkl, MAX_PICKLE_BYTES, false)?.ok_or(PthErrorKind::MissingDataPkl)?;
    let parsed = Unpickler::new(&pickle).run()?;

    // Load every referenced storage once, as f32.
    let mut storages: Vec<Vec<f32>> = Vec::with_capacity(parsed.storages.len());
    let mut total_storage_elems: u64 = 0;
    for st in &parsed.storages {
        let record = format!("{prefix}data/{}", st.key);
        let elem = st.dtype.size() as u64;
        let needs = st
            .numel
            .checked_mul(elem)
            .ok_or_else(|| PthErrorKind::Limit(format!("storage {record} is too large")))?;
        let bytes = read_record(&record, needs, true)?
            .ok_or_else(|| PthErrorKind::MissingStorage(quote(&record)))?;
        let has = bytes.len() as u64;
        if has < needs {
            return Err(PthErrorKind::TruncatedStorage {
                record: quote(&record),
                needs,
                has,
            });
        }
        storages.push(decode_storage(&bytes, st.dtype, st.numel as usize));
        total_storage_elems = total_storage_elems.saturating_add(st.numel);
    }

    // Validate every view against its storage, then materialise.
    let budget = total_storage_elems
        .saturating_mul(OUTPUT_AMPLIFICATION)
        .saturating_add(OUTPUT_SLACK);
    let mut total_out: u64 = 0;
    let mut out = Vec::with_capacity(parsed.entries.len());
    for (name, t) in parsed.entries {
        let bad = |msg: String| PthErrorKind::BadTensor {
            name: quote(&name),
            msg,
        };
        let Some(src) = storages.get(t.storage) else {
            return Err(bad("storage index out of range".into()));
        };
        let numel = check_view(&t, src.len() as u64).map_err(bad)?;
        total_out = total_out.saturating_add(numel);
        if total_out > budget {
            return Err(PthErrorKind::Limit(format!(
                "tensors hold {total_out}+ elements in total but the file has only \
                 {total_storage_elems} stored elements"
            )));
        }
        let data = gather(src, &t).ok_or_else(|| bad("view out of bounds".into()))?;
        out.push(PthTensor {
            name,
            shape: t.shape,
            data,
        });
    }
    Ok(out)
}

/// Reads one record, refusing compressed records. Records up to `limit` bytes are read
/// completely (which makes the zip layer verify their CRC-32); of a longer record only the
/// first `limit` bytes are read if `allow_longer`, else it is an error.
fn read_zip_record<R: Read + Seek>(
    zip: &mut zip::ZipArchive<R>,
    index: usize,
    name: &str,
    limit: u64,
    allow_longer: bool,
    total_len: u64,
) -> Result<Vec<u8>, PthErrorKind> {
    let rec_err = |msg: String| PthErrorKind::ZipRecord {
        record: quote(name),
        msg,
    };
    let entry = zip.by_index(index).map_err(|e| rec_err(e.to_string()))?;
    if entry.compression() != zip::CompressionMethod::Stored {
        return Err(rec_err(format!(
            "compressed with {:?} (torch.save stores records uncompressed)",
            entry.compression()
        )));
    }
    let size = entry.size();
    if size > total_len {
        return Err(rec_err(format!(
            "declares {size} bytes, more than the whole file"
        )));
    }
    if size > limit && !allow_longer {
        return Err(PthErrorKind::Limit(format!(
            "record {} has {size} bytes (max {limit})",
            quote(name)
        )));
    }
    let want = size.min(limit);
    let mut buf = Vec::with_capacity(usize::try_from(want).unwrap_or(0));
    let mut entry = entry;
    if size <= limit {
        // Read to the end so the zip layer verifies the CRC-32.
        entry
            .read_to_end(&mut buf)
            .map_err(|e| rec_err(e.to_string()))?;
        if buf.len() as u64 > size {
            return Err(rec_err("longer than declared".into()));
        }
    } else {
        (&mut entry)
            .take(limit)
            .read_to_end(&mut buf)
            .map_err(|e| rec_err(e.to_string()))?;
    }
    Ok(buf)
}

// ---------------------------------------------------------------------------------------------
// Dtypes and tensor materialisation
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dtype {
    F32,
    F64,
    F16,
    BF16,
}

impl Dtype {
    fn from_storage_name(name: &str) -> Option<Dtype> {
        Some(match name {
            "FloatStorage" => Dtype::F32,
            "DoubleStorage" => Dtype::F64,
            "HalfStorage" => Dtype::F16,
            "BFloat16Storage" => Dtype::BF16,
            _ => return None,
        })
    }
    fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F64 => 8,
            Dtype::F16 | Dtype::BF16 => 2,
        }
    }
}

/// Known torch storage classes this reader does not convert (reported as a dtype problem rather
/// than as a disallowed global).
const OTHER_TORCH_STORAGES: &[&str] = &[
    "LongStorage",
    "IntStorage",
    "ShortStorage",
    "CharStorage",
    "ByteStorage",
    "BoolStorage",
    "ComplexFloatStorage",
    "ComplexDoubleStorage",
    "QInt8Storage",
    "QUInt8Storage",
    "QInt32Storage",
    "QUInt4x2Storage",
    "QUInt2x4Storage",
    "UntypedStorage",
];

fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: value = man * 2^-24.
            let v = man as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, _) => sign | 0x7fc0_0000 | (man << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// Decodes the first `numel` elements of a little-endian storage (caller checked the length).
fn decode_storage(bytes: &[u8], dtype: Dtype, numel: usize) -> Vec<f32> {
    let n = dtype.size();
    let bytes = &bytes[..(numel * n).min(bytes.len())];
    match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
            .collect(),
    }
}

/// Checks a view against a storage of `storage_numel` elements; returns the view's numel.
fn check_view(t: &TensorSpec, storage_numel: u64) -> Result<u64, String> {
    let mut numel: u64 = 1;
    for &d in &t.shape {
        numel = numel
            .checked_mul(d as u64)
            .filter(|&n| n <= MAX_TENSOR_ELEMENTS)
            .ok_or_else(|| format!("shape {:?} has more than 2^31 elements", t.shape))?;
    }
    if numel == 0 {
        return Ok(0);
    }
    if numel > storage_numel {
        return Err(format!(
            "shape {:?} has {numel} elements but its storage only {storage_numel}",
            t.shape
        ));
    }
    // Largest element index touched: offset + sum((size - 1) * stride).
    let mut last: u128 = t.offset as u128;
    for (&d, &s) in t.shape.iter().zip(&t.stride) {
        last += (d as u128 - 1) * s as u128;
    }
    if last >= storage_numel as u128 {
        return Err(format!(
            "view (offset {}, shape {:?}, stride {:?}) reaches element {last} of a storage of \
             {storage_numel} elements",
            t.offset, t.shape, t.stride
        ));
    }
    Ok(numel)
}

/// Copies a (validated) strided view into a contiguous row-major buffer. `None` if any index
/// falls outside `src` (cannot happen after [`check_view`], but never panics either way).
fn gather(src: &[f32], t: &TensorSpec) -> Option<Vec<f32>> {
    let numel = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
    let mut out = Vec::with_capacity(numel.min(src.len()));
    if numel == 0 {
        return Some(out);
    }
    let Some((&inner_n, outer)) = t.shape.split_last() else {
        // 0-d tensor.
        out.push(*src.get(t.offset)?);
        return Some(out);
    };
    let inner_s = *t.stride.last()?;
    let outer_stride = &t.stride[..outer.len()];
    let mut idx = vec![0usize; outer.len()];
    let mut base = t.offset;
    loop {
        if inner_s == 1 {
            out.extend_from_slice(src.get(base..base.checked_add(inner_n)?)?);
        } else {
            for i in 0..inner_n {
                out.push(*src.get(base.checked_add(i.checked_mul(inner_s)?)?)?);
            }
        }
        // Odometer over the outer dimensions.
        let mut k = outer.len();
        loop {
            if k == 0 {
                return Some(out);
            }
            k -= 1;
            idx[k] += 1;
            base = base.checked_add(outer_stride[k])?;
            if idx[k] < outer[k] {
                break;
            }
            base -= outer_stride[k] * outer[k];
            idx[k] = 0;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pickle interpreter
// ---------------------------------------------------------------------------------------------

/// The only callables/classes a state-dict pickle may reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    Storage(Dtype),
}

/// A pickle value. Containers live in the interpreter's arena and are referenced by index, so
/// values are cheap to copy (memo gets), shared like Python objects, and never nest on the Rust
/// heap (no recursive drops, cycles are harmless).
#[derive(Debug, Clone)]
#[allow(
    dead_code,
    reason = "bool/float payloads are only kept for Debug output"
)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Global(Global),
    Obj(usize),
}

#[derive(Debug)]
enum Obj {
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// Result of a persistent load: index into `Unpickler::storages`.
    Storage(usize),
    Tensor(TensorSpec),
}

#[derive(Debug, Clone)]
struct TensorSpec {
    storage: usize,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

#[derive(Debug, Clone)]
struct StorageRef {
    key: String,
    dtype: Dtype,
    numel: u64,
}

struct Parsed {
    entries: Vec<(String, TensorSpec)>,
    storages: Vec<StorageRef>,
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    /// Position of the opcode being executed (for error messages).
    op_pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    objs: Vec<Obj>,
    storages: Vec<StorageRef>,
    storage_index: HashMap<String, usize>,
}

type PResult<T> = Result<T, PthErrorKind>;

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Unpickler {
            data,
            pos: 0,
            op_pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            objs: Vec::new(),
            storages: Vec::new(),
            storage_index: HashMap::new(),
        }
    }

    fn err<T>(&self, msg: impl Into<String>) -> PResult<T> {
        Err(PthErrorKind::Pickle {
            pos: self.op_pos,
            msg: msg.into(),
        })
    }

    fn take(&mut self, n: usize) -> PResult<&'a [u8]> {
        match self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.data.len())
        {
            Some(end) => {
                let s = &self.data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(PthErrorKind::Pickle {
                pos: self.op_pos,
                msg: format!(
                    "truncated (needs {n} more bytes, has {})",
                    self.data.len() - self.pos
                ),
            }),
        }
    }

    fn u8(&mut self) -> PResult<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> PResult<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> PResult<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> PResult<u64> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes([
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
        ]))
    }

    /// A `\n`-terminated ASCII line (GLOBAL operands), at most 256 bytes.
    fn line(&mut self) -> PResult<&'a str> {
        let rest = &self.data[self.pos..];
        let Some(n) = rest.iter().take(257).position(|&b| b == b'\n') else {
            return self.err("unterminated or overlong GLOBAL name");
        };
        let s = &rest[..n];
        self.pos += n + 1;
        match std::str::from_utf8(s) {
            Ok(s) if s.is_ascii() => Ok(s),
            _ => self.err("non-ASCII GLOBAL name"),
        }
    }

    fn string(&mut self, n: u64) -> PResult<Value> {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        let b = self.take(n)?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(Value::Str(Rc::from(s))),
            Err(_) => self.err("invalid UTF-8 in string"),
        }
    }

    fn push(&mut self, v: Value) -> PResult<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(PthErrorKind::Limit(format!(
                "pickle stack deeper than {MAX_STACK}"
            )));
        }
        self.stack.push(v);
        Ok(())
    }

    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> PResult<Value> {
        if self.stack.len() <= self.floor() {
            return self.err("stack underflow");
        }
        match self.stack.pop() {
            Some(v) => Ok(v),
            None => self.err("stack underflow"),
        }
    }

    fn top(&self) -> PResult<&Value> {
        if self.stack.len() <= self.floor() {
            return self.err("stack underflow");
        }
        match self.stack.last() {
            Some(v) => Ok(v),
            None => self.err("stack underflow"),
        }
    }

    fn pop_mark(&mut self) -> PResult<Vec<Value>> {
        let Some(m) = self.marks.pop() else {
            return self.err("no MARK on the stack");
        };
        if m > self.stack.len() {
            return self.err("MARK above the stack top");
        }
        Ok(self.stack.split_off(m))
    }

    fn alloc(&mut self, o: Obj) -> PResult<Value> {
        if self.objs.len() >= MAX_OBJECTS {
            return Err(PthErrorKind::Limit(format!(
                "more than {MAX_OBJECTS} pickle objects"
            )));
        }
        self.objs.push(o);
        Ok(Value::Obj(self.objs.len() - 1))
    }

    fn memo_put(&mut self, idx: u32) -> PResult<()> {
        let v = self.top()?.clone();
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&idx) {
            return Err(PthErrorKind::Limit(format!(
                "more than {MAX_MEMO} memo entries"
            )));
        }
        self.memo.insert(idx, v);
        Ok(())
    }

    fn memo_get(&mut self, idx: u32) -> PResult<()> {
        match self.memo.get(&idx) {
            Some(v) => {
                let v = v.clone();
                self.push(v)
            }
            None => self.err(format!("memo key {idx} not defined")),
        }
    }

    fn obj(&self, v: &Value) -> Option<&Obj> {
        match v {
            Value::Obj(i) => self.objs.get(*i),
            _ => None,
        }
    }

    fn type_name(&self, v: &Value) -> &'static str {
        match v {
            Value::None => "None",
            Value::Bool(_) => "a bool",
            Value::Int(_) => "an int",
            Value::Float(_) => "a float",
            Value::Str(_) => "a str",
            Value::Global(_) => "a class or function",
            Value::Obj(_) => match self.obj(v) {
                Some(Obj::Tuple(_)) => "a tuple",
                Some(Obj::List(_)) => "a list",
                Some(Obj::Dict(_)) => "a dict",
                Some(Obj::Storage(_)) => "a storage",
                Some(Obj::Tensor(_)) => "a tensor",
                None => "an invalid object",
            },
        }
    }

    fn resolve_global(&self, module: &str, name: &str) -> PResult<Global> {
        match (module, name) {
            ("collections", "OrderedDict") => Ok(Global::OrderedDict),
            ("torch._utils", "_rebuild_tensor_v2") => Ok(Global::RebuildTensorV2),
            ("torch._utils", "_rebuild_parameter") => Ok(Global::RebuildParameter),
            ("torch", n) => match Dtype::from_storage_name(n) {
                Some(dt) => Ok(Global::Storage(dt)),
                None if OTHER_TORCH_STORAGES.contains(&n) => Err(PthErrorKind::UnsupportedDtype(
                    format!("torch.{n} (supported: float32, float64, float16, bfloat16)"),
                )),
                None => Err(PthErrorKind::DisallowedGlobal(format!(
                    "torch.{}",
                    quote_bare(n)
                ))),
            },
            _ => Err(PthErrorKind::DisallowedGlobal(format!(
                "{}.{}",
                quote_bare(module),
                quote_bare(name)
            ))),
        }
    }

    fn run(mut self) -> PResult<Parsed> {
        loop {
            self.op_pos = self.pos;
            let op = match self.data.get(self.pos) {
                Some(&b) => b,
                None => return self.err("ended without STOP (truncated pickle)"),
            };
            self.pos += 1;
            match op {
                0x80 => {
                    // PROTO
                    let p = self.u8()?;
                    if p > 5 {
                        return self.err(format!("unsupported pickle protocol {p}"));
                    }
                }
                0x95 => {
                    // FRAME: only a length hint.
                    self.u64()?;
                }
                b'c' => {
                    // GLOBAL
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = self.resolve_global(module, name)?;
                    self.push(Value::Global(g))?;
                }
                0x93 => {
                    // STACK_GLOBAL
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        return self.err("STACK_GLOBAL needs two strings");
                    };
                    let g = self.resolve_global(&module, &name)?;
                    self.push(Value::Global(g))?;
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?;
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?;
                }
                0x94 => {
                    // MEMOIZE
                    let i = u32::try_from(self.memo.len()).unwrap_or(u32::MAX);
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    self.memo_get(i)?;
                }
                b'j' => {
                    let i = self.u32()?;
                    self.memo_get(i)?;
                }
                b'(' => {
                    if self.marks.len() >= MAX_MARKS {
                        return Err(PthErrorKind::Limit(format!(
                            "more than {MAX_MARKS} nested MARKs"
                        )));
                    }
                    self.marks.push(self.stack.len());
                }
                b'}' => {
                    let v = self.alloc(Obj::Dict(Vec::new()))?;
                    self.push(v)?;
                }
                b']' => {
                    let v = self.alloc(Obj::List(Vec::new()))?;
                    self.push(v)?;
                }
                b')' => {
                    let v = self.alloc(Obj::Tuple(Vec::new()))?;
                    self.push(v)?;
                }
                b't' => {
                    let items = self.pop_mark()?;
                    let v = self.alloc(Obj::Tuple(items))?;
                    self.push(v)?;
                }
                0x85..=0x87 => {
                    // TUPLE1..3
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    let v = self.alloc(Obj::Tuple(items))?;
                    self.push(v)?;
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Value::Int(v as i64))?;
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64))?;
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Value::Int(v as i64))?;
                }
                0x8a | 0x8b => {
                    // LONG1 / LONG4: little-endian two's complement.
                    let n = if op == 0x8a {
                        self.u8()? as usize
                    } else {
                        self.u32()? as usize
                    };
                    let b = self.take(n)?;
                    if n > 8 {
                        return self.err(format!("integer of {n} bytes is too large"));
                    }
                    let mut buf = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                        [0xff; 8]
                    } else {
                        [0; 8]
                    };
                    buf[..n].copy_from_slice(b);
                    self.push(Value::Int(i64::from_le_bytes(buf)))?;
                }
                b'G' => {
                    let b = self.take(8)?;
                    let v = f64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
                    self.push(Value::Float(v))?;
                }
                b'X' => {
                    let n = self.u32()? as u64;
                    let v = self.string(n)?;
                    self.push(v)?;
                }
                0x8c => {
                    let n = self.u8()? as u64;
                    let v = self.string(n)?;
                    self.push(v)?;
                }
                0x8d => {
                    let n = self.u64()?;
                    let v = self.string(n)?;
                    self.push(v)?;
                }
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'N' => self.push(Value::None)?,
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v)?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(&pid)?;
                    self.push(v)?;
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = self.reduce(&func, &args)?;
                    self.push(v)?;
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    self.dict_mut()?.push((key, value));
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return self.err("SETITEMS with an odd number of items");
                    }
                    let mut it = items.into_iter();
                    let dict = self.dict_mut()?;
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        dict.push((k, v));
                    }
                }
                b'a' => {
                    let value = self.pop()?;
                    self.list_mut()?.push(value);
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.list_mut()?.extend(items);
                }
                b'b' => {
                    // BUILD: torch sets `_metadata` (module versions) on the OrderedDict; ignored.
                    let _state = self.pop()?;
                    let target = self.top()?;
                    if !matches!(self.obj(target), Some(Obj::Dict(_))) {
                        let t = self.type_name(target);
                        return self.err(format!("BUILD on {t} (only dicts are accepted)"));
                    }
                }
                b'.' => {
                    let result = self.pop()?;
                    return self.finish(result);
                }
                _ => {
                    return Err(PthErrorKind::UnsupportedOpcode {
                        op,
                        pos: self.op_pos,
                    });
                }
            }
        }
    }

    fn dict_mut(&mut self) -> PResult<&mut Vec<(Value, Value)>> {
        let top = self.top()?;
        let name = self.type_name(top);
        let idx = match *top {
            Value::Obj(i) if matches!(self.objs.get(i), Some(Obj::Dict(_))) => i,
            _ => return self.err(format!("SETITEM(S) on {name}")),
        };
        match self.objs.get_mut(idx) {
            Some(Obj::Dict(d)) => Ok(d),
            _ => Err(PthErrorKind::Pickle {
                pos: self.op_pos,
                msg: format!("SETITEM(S) on {name}"),
            }),
        }
    }

    fn list_mut(&mut self) -> PResult<&mut Vec<Value>> {
        let top = self.top()?;
        let name = self.type_name(top);
        let idx = match *top {
            Value::Obj(i) if matches!(self.objs.get(i), Some(Obj::List(_))) => i,
            _ => return self.err(format!("APPEND(S) on {name}")),
        };
        match self.objs.get_mut(idx) {
            Some(Obj::List(l)) => Ok(l),
            _ => Err(PthErrorKind::Pickle {
                pos: self.op_pos,
                msg: format!("APPEND(S) on {name}"),
            }),
        }
    }

    fn tuple(&self, v: &Value) -> Option<&[Value]> {
        match self.obj(v) {
            Some(Obj::Tuple(t)) => Some(t),
            _ => None,
        }
    }

    /// `('storage', torch.<X>Storage, '<key>', '<location>', numel)`.
    fn persistent_load(&mut self, pid: &Value) -> PResult<Value> {
        let Some(t) = self.tuple(pid) else {
            let t = self.type_name(pid);
            return self.err(format!("persistent id is {t}, expected a tuple"));
        };
        let [
            Value::Str(kind),
            Value::Global(g),
            Value::Str(key),
            Value::Str(_location),
            Value::Int(numel),
        ] = t
        else {
            return self.err("persistent id is not ('storage', dtype, key, location, numel)");
        };
        if &**kind != "storage" {
            return self.err(format!("persistent id of kind {}", quote(kind)));
        }
        let Global::Storage(dtype) = *g else {
            return self.err("persistent id without a storage dtype");
        };
        if key.is_empty()
            || key.len() > 64
            || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return self.err(format!("invalid storage key {}", quote(key)));
        }
        let numel = u64::try_from(*numel)
            .ok()
            .filter(|&n| n <= MAX_TENSOR_ELEMENTS)
            .ok_or_else(|| {
                PthErrorKind::Limit(format!("storage {} has {numel} elements", quote(key)))
            })?;
        let idx = match self.storage_index.get(&**key) {
            Some(&i) => {
                let s = &self.storages[i];
                if s.dtype != dtype || s.numel != numel {
                    return self.err(format!(
                        "storage {} referenced with conflicting dtype/size",
                        quote(key)
                    ));
                }
                i
            }
            None => {
                let key = key.to_string();
                self.storages.push(StorageRef {
                    key: key.clone(),
                    dtype,
                    numel,
                });
                self.storage_index.insert(key, self.storages.len() - 1);
                self.storages.len() - 1
            }
        };
        self.alloc(Obj::Storage(idx))
    }

    fn reduce(&mut self, func: &Value, args: &Value) -> PResult<Value> {
        let Value::Global(g) = *func else {
            let t = self.type_name(func);
            return self.err(format!("REDUCE calls {t}"));
        };
        let Some(args) = self.tuple(args) else {
            let t = self.type_name(args);
            return self.err(format!("REDUCE arguments are {t}, expected a tuple"));
        };
        match g {
            Global::OrderedDict => {
                if !args.is_empty() {
                    return self.err("OrderedDict() with arguments is not supported");
                }
                self.alloc(Obj::Dict(Vec::new()))
            }
            Global::RebuildParameter => {
                // _rebuild_parameter(data, requires_grad, backward_hooks)
                match args {
                    [t @ Value::Obj(_), Value::Bool(_), _]
                        if matches!(self.obj(t), Some(Obj::Tensor(_))) =>
                    {
                        Ok(t.clone())
                    }
                    _ => self.err("_rebuild_parameter arguments are not (tensor, bool, hooks)"),
                }
            }
            Global::RebuildTensorV2 => {
                // _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
                //                    backward_hooks[, metadata])
                if args.len() != 6 && args.len() != 7 {
                    return self.err(format!("_rebuild_tensor_v2 with {} arguments", args.len()));
                }
                let storage = match self.obj(&args[0]) {
                    Some(Obj::Storage(i)) => *i,
                    _ => return self.err("_rebuild_tensor_v2: first argument is not a storage"),
                };
                let offset = match args[1] {
                    Value::Int(o) if o >= 0 => usize::try_from(o).ok(),
                    _ => None,
                };
                let Some(offset) = offset else {
                    return self.err("_rebuild_tensor_v2: invalid storage offset");
                };
                let shape = self.usize_tuple(&args[2], "size")?;
                let stride = self.usize_tuple(&args[3], "stride")?;
                if shape.len() != stride.len() {
                    return self.err(format!(
                        "_rebuild_tensor_v2: size has {} dims but stride {}",
                        shape.len(),
                        stride.len()
                    ));
                }
                if !matches!(args[4], Value::Bool(_)) {
                    return self.err("_rebuild_tensor_v2: requires_grad is not a bool");
                }
                if !matches!(self.obj(&args[5]), Some(Obj::Dict(_))) {
                    return self.err("_rebuild_tensor_v2: backward_hooks is not a dict");
                }
                if let Some(meta) = args.get(6)
                    && !matches!(meta, Value::None)
                    && !matches!(self.obj(meta), Some(Obj::Dict(_)))
                {
                    return self.err("_rebuild_tensor_v2: metadata is not None or a dict");
                }
                self.alloc(Obj::Tensor(TensorSpec {
                    storage,
                    offset,
                    shape,
                    stride,
                }))
            }
            Global::Storage(dt) => {
                self.err(format!("calling a storage class ({dt:?}) is not supported"))
            }
        }
    }

    fn usize_tuple(&self, v: &Value, what: &str) -> PResult<Vec<usize>> {
        let Some(items) = self.tuple(v) else {
            return self.err(format!("_rebuild_tensor_v2: {what} is not a tuple"));
        };
        if items.len() > MAX_NDIM {
            return self.err(format!(
                "_rebuild_tensor_v2: {what} has {} dims (max {MAX_NDIM})",
                items.len()
            ));
        }
        items
            .iter()
            .map(|x| match *x {
                Value::Int(i) if i >= 0 => usize::try_from(i).ok(),
                _ => None,
            })
            .collect::<Option<Vec<usize>>>()
            .map_or_else(
                || {
                    self.err(format!(
                        "_rebuild_tensor_v2: {what} has a non-natural entry"
                    ))
                },
                Ok,
            )
    }

    fn finish(self, result: Value) -> PResult<Parsed> {
        let Some(Obj::Dict(items)) = self.obj(&result) else {
            return Err(PthErrorKind::NotADict(self.type_name(&result).into()));
        };
        let mut seen: HashSet<&str> = HashSet::with_capacity(items.len());
        let mut entries = Vec::with_capacity(items.len());
        for (k, v) in items {
            let Value::Str(key) = k else {
                return Err(PthErrorKind::BadEntry {
                    key: format!("<{}>", self.type_name(k)),
                    msg: "key is not a string".into(),
                });
            };
            if !seen.insert(key) {
                return Err(PthErrorKind::BadEntry {
                    key: quote(key),
                    msg: "duplicate key".into(),
                });
            }
            let Some(Obj::Tensor(t)) = self.obj(v) else {
                return Err(PthErrorKind::BadEntry {
                    key: quote(key),
                    msg: format!("value is {}, expected a tensor", self.type_name(v)),
                });
            };
            entries.push((key.to_string(), t.clone()));
        }
        Ok(Parsed {
            entries,
            storages: self.storages,
        })
    }
}

/// Like [`quote`] without the quotes (for dotted global names inside `'...'`).
fn quote_bare(s: &str) -> String {
    let q = quote(s);
    q[1..q.len() - 1].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/ref-tms_5-2")
            .join(name)
    }

    fn get<'a>(ts: &'a [PthTensor], name: &str) -> &'a PthTensor {
        ts.iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("missing key {name}"))
    }

    /// Transpose of a row-major [r, c] matrix.
    fn transpose(t: &PthTensor) -> Vec<f32> {
        let [r, c] = t.shape[..] else {
            panic!("{} is not 2-d", t.name)
        };
        let mut out = vec![0.0; r * c];
        for i in 0..r {
            for j in 0..c {
                out[j * r + i] = t.data[i * c + j];
            }
        }
        out
    }

    /// (key, shape, stride) rows of one `=== <section>` block of keys.txt.
    fn keys_txt(section: &str) -> Vec<(String, Vec<usize>, Vec<usize>)> {
        let text = std::fs::read_to_string(fixture("keys.txt")).unwrap();
        let parse = |s: &str| -> Vec<usize> {
            s.trim_matches(|c| c == '[' || c == ']')
                .split(',')
                .filter(|x| !x.trim().is_empty())
                .map(|x| x.trim().parse().unwrap())
                .collect()
        };
        let mut rows = Vec::new();
        let mut inside = false;
        for line in text.lines() {
            if let Some(name) = line.strip_prefix("=== ") {
                inside = name.trim() == section;
                continue;
            }
            let cols: Vec<&str> = line.split('\t').collect();
            if inside && cols.len() == 7 && cols[0] != "key" {
                assert_eq!(cols[2], "torch.float32");
                rows.push((cols[0].to_string(), parse(cols[1]), parse(cols[4])));
            }
        }
        assert!(!rows.is_empty(), "section {section} not found in keys.txt");
        rows
    }

    /// A numeric matrix (list of lists) from ci_reference.json, located by a path of keys.
    fn json_matrix(keys: &[&str]) -> Vec<Vec<f32>> {
        let text = std::fs::read_to_string(fixture("ci_reference.json")).unwrap();
        let mut pos = 0;
        // Find `"key": {` / `"key": [` (skipping mentions of the key as a string value).
        for k in keys {
            let pat = format!("\"{k}\"");
            loop {
                pos += text[pos..].find(&pat).unwrap() + pat.len();
                let rest = text[pos..].trim_start();
                if let Some(r) = rest.strip_prefix(':')
                    && r.trim_start().starts_with(['{', '['])
                {
                    break;
                }
            }
        }
        pos += text[pos..].find('[').unwrap();
        let mut rows = Vec::new();
        let mut depth = 0;
        let mut num = String::new();
        let mut row = Vec::new();
        for c in text[pos..].chars() {
            match c {
                '[' => depth += 1,
                ']' | ',' => {
                    if !num.trim().is_empty() {
                        row.push(num.trim().parse::<f32>().unwrap());
                    }
                    num.clear();
                    if c == ']' {
                        depth -= 1;
                        if depth == 1 {
                            rows.push(std::mem::take(&mut row));
                        }
                        if depth == 0 {
                            break;
                        }
                    }
                }
                _ => num.push(c),
            }
        }
        rows
    }

    fn matmul(a: &[Vec<f32>], b: &PthTensor) -> Vec<Vec<f32>> {
        let [k, n] = b.shape[..] else { panic!() };
        a.iter()
            .map(|row| {
                assert_eq!(row.len(), k);
                (0..n)
                    .map(|j| (0..k).map(|i| row[i] * b.data[i * n + j]).sum())
                    .collect()
            })
            .collect()
    }

    fn assert_close(got: &[Vec<f32>], want: &[Vec<f32>], tol: f32, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g.len(), w.len(), "{what}");
            for (x, y) in g.iter().zip(w) {
                assert!((x - y).abs() <= tol, "{what}: {x} vs {y}");
            }
        }
    }

    fn check_against_keys_txt(ts: &[PthTensor], section: &str) {
        let rows = keys_txt(section);
        let names: Vec<&str> = ts.iter().map(|t| t.name.as_str()).collect();
        let want: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        assert_eq!(names, want, "keys / order of {section}");
        for (t, (_, shape, _)) in ts.iter().zip(&rows) {
            assert_eq!(&t.shape, shape, "{}", t.name);
            assert_eq!(t.data.len(), shape.iter().product::<usize>(), "{}", t.name);
            assert!(t.data.iter().all(|x| x.is_finite()), "{}", t.name);
        }
    }

    /// TMS forward pass: relu((x @ W1^T) @ W2^T + b), W1 = [n_hidden, n_features].
    fn tms_forward(w1: &PthTensor, w2: &PthTensor, b: &PthTensor, x: &[Vec<f32>]) -> Vec<Vec<f32>> {
        let w1t = PthTensor {
            name: "w1t".into(),
            shape: vec![w1.shape[1], w1.shape[0]],
            data: transpose(w1),
        };
        let w2t = PthTensor {
            name: "w2t".into(),
            shape: vec![w2.shape[1], w2.shape[0]],
            data: transpose(w2),
        };
        let h = matmul(x, &w1t);
        matmul(&h, &w2t)
            .into_iter()
            .map(|r| {
                r.iter()
                    .zip(&b.data)
                    .map(|(v, b)| (v + b).max(0.0))
                    .collect()
            })
            .collect()
    }

    // ----------------------------------------------------------------------------- fixtures

    #[test]
    fn reads_spd_checkpoint() {
        let ts = read_pth(&fixture("model_10000.pth")).unwrap();
        check_against_keys_txt(&ts, "spd/model_10000.pth");

        // Tied / transposed views equal the transpose of their base.
        let t = |n| get(&ts, n);
        assert_eq!(
            t("_components.linear2.U").data,
            transpose(t("_components.linear1.V"))
        );
        assert_eq!(
            t("_components.linear2.V").data,
            transpose(t("_components.linear1.U"))
        );
        assert_eq!(
            t("target_model.linear2.weight").data,
            transpose(t("target_model.linear1.weight"))
        );
        assert_eq!(
            t("_components.linear2.bias").data,
            t("target_model.linear2.bias").data
        );
        // Not everything is the same buffer: the views really are materialised separately.
        assert_ne!(
            t("_components.linear1.V").data[..20],
            t("_components.linear1.V").data[20..40]
        );

        // Values: component activations x @ V match the Python reference.
        let x1 = json_matrix(&["module_inputs", "linear1"]);
        let x2 = json_matrix(&["module_inputs", "linear2"]);
        let want1 = json_matrix(&["component_acts", "linear1"]);
        let want2 = json_matrix(&["component_acts", "linear2"]);
        assert_eq!(want1.len(), 10);
        assert_eq!(want1[0].len(), 20);
        assert_close(
            &matmul(&x1, t("_components.linear1.V")),
            &want1,
            1e-5,
            "acts linear1",
        );
        assert_close(
            &matmul(&x2, t("_components.linear2.V")),
            &want2,
            1e-5,
            "acts linear2",
        );
        // The target model inside the checkpoint reproduces the target output.
        let out = tms_forward(
            t("target_model.linear1.weight"),
            t("target_model.linear2.weight"),
            t("target_model.linear2.bias"),
            &json_matrix(&["inputs"]),
        );
        assert_close(
            &out,
            &json_matrix(&["target_output"]),
            1e-5,
            "target output",
        );
    }

    #[test]
    fn reads_target_checkpoints() {
        let spd = read_pth(&fixture("model_10000.pth")).unwrap();
        for (file, section) in [("tms.pth", "target/tms.pth"), ("tms.pth", "spd/tms.pth")] {
            let ts = read_pth(&fixture(file)).unwrap();
            check_against_keys_txt(&ts, section);
            let t = |n| get(&ts, n);
            assert_eq!(t("linear2.weight").data, transpose(t("linear1.weight")));
            for k in ["linear1.weight", "linear2.weight", "linear2.bias"] {
                assert_eq!(
                    t(k).data,
                    get(&spd, &format!("target_model.{k}")).data,
                    "{k}"
                );
            }
            let out = tms_forward(
                t("linear1.weight"),
                t("linear2.weight"),
                t("linear2.bias"),
                &json_matrix(&["inputs"]),
            );
            assert_close(
                &out,
                &json_matrix(&["target_output"]),
                1e-5,
                "target output",
            );
        }
        // read_pth and read_pth_bytes agree.
        let bytes = std::fs::read(fixture("tms.pth")).unwrap();
        assert_eq!(
            read_pth_bytes(&bytes, "x.pth").unwrap(),
            read_pth(&fixture("tms.pth")).unwrap()
        );
    }

    // ----------------------------------------------------------------------------- builders

    /// A stored (uncompressed) zip with the given records.
    fn make_zip(records: &[(&str, &[u8])]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for (name, data) in records {
            w.start_file(*name, opts).unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    struct Spec<'a> {
        key: &'a str,
        dtype: &'a str,
        storage: &'a str,
        numel: u32,
        offset: u32,
        shape: &'a [u32],
        stride: &'a [u32],
    }

    fn op_str(p: &mut Vec<u8>, s: &str) {
        p.push(b'X');
        p.extend_from_slice(&(s.len() as u32).to_le_bytes());
        p.extend_from_slice(s.as_bytes());
    }

    fn op_int(p: &mut Vec<u8>, v: u32) {
        p.push(b'J');
        p.extend_from_slice(&v.to_le_bytes());
    }

    fn op_global(p: &mut Vec<u8>, module: &str, name: &str) {
        p.push(b'c');
        p.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }

    /// The pickle torch.save writes for an OrderedDict of tensors (without memo ops).
    fn state_dict_pickle(specs: &[Spec]) -> Vec<u8> {
        let mut p = vec![0x80, 2];
        op_global(&mut p, "collections", "OrderedDict");
        p.extend_from_slice(b")R(");
        for s in specs {
            op_str(&mut p, s.key);
            op_global(&mut p, "torch._utils", "_rebuild_tensor_v2");
            p.extend_from_slice(b"((");
            op_str(&mut p, "storage");
            op_global(&mut p, "torch", s.dtype);
            op_str(&mut p, s.storage);
            op_str(&mut p, "cpu");
            op_int(&mut p, s.numel);
            p.extend_from_slice(b"tQ");
            op_int(&mut p, s.offset);
            p.push(b'(');
            s.shape.iter().for_each(|&d| op_int(&mut p, d));
            p.extend_from_slice(b"t(");
            s.stride.iter().for_each(|&d| op_int(&mut p, d));
            p.extend_from_slice(b"t\x89");
            op_global(&mut p, "collections", "OrderedDict");
            p.extend_from_slice(b")RtR");
        }
        p.extend_from_slice(b"u.");
        p
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn checkpoint(pickle: &[u8], storages: &[(&str, &[u8])]) -> Vec<u8> {
        let names: Vec<String> = storages
            .iter()
            .map(|(k, _)| format!("arch/data/{k}"))
            .collect();
        let mut recs: Vec<(&str, &[u8])> =
            vec![("arch/data.pkl", pickle), ("arch/byteorder", b"little")];
        for (n, (_, d)) in names.iter().zip(storages) {
            recs.push((n, d));
        }
        recs.push(("arch/version", b"3\n"));
        make_zip(&recs)
    }

    fn spec<'a>(
        key: &'a str,
        numel: u32,
        offset: u32,
        shape: &'a [u32],
        stride: &'a [u32],
    ) -> Spec<'a> {
        Spec {
            key,
            dtype: "FloatStorage",
            storage: "0",
            numel,
            offset,
            shape,
            stride,
        }
    }

    fn read_err(bytes: &[u8]) -> String {
        let e = read_pth_bytes(bytes, "crafted.pth").unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("crafted.pth: "), "{msg}");
        assert!(!msg.contains('\n') && !msg.contains('\r'), "{msg}");
        msg
    }

    // ----------------------------------------------------------------------------- views

    #[test]
    fn strided_views_offsets_and_edge_shapes() {
        let vals: Vec<f32> = (0..24).map(|i| i as f32).collect();
        let pk = state_dict_pickle(&[
            spec("full", 24, 0, &[2, 3, 4], &[12, 4, 1]),
            spec("perm", 24, 0, &[4, 2, 3], &[1, 12, 4]), // permute(2, 0, 1)
            spec("offset_t", 24, 5, &[3, 2], &[1, 3]),    // transposed view at offset 5
            spec("scalar", 24, 7, &[], &[]),
            spec("empty", 24, 0, &[0, 5], &[5, 1]),
            spec("bcast", 24, 2, &[3, 2], &[0, 1]), // stride-0 (expanded) view
        ]);
        let bytes = checkpoint(&pk, &[("0", &f32_bytes(&vals))]);
        let ts = read_pth_bytes(&bytes, "views.pth").unwrap();
        let names: Vec<&str> = ts.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            ["full", "perm", "offset_t", "scalar", "empty", "bcast"]
        );
        assert_eq!(ts[0].data, vals);
        let mut perm = Vec::new();
        for k in 0..4 {
            for i in 0..2 {
                for j in 0..3 {
                    perm.push((i * 12 + j * 4 + k) as f32);
                }
            }
        }
        assert_eq!(ts[1].data, perm);
        assert_eq!(ts[2].data, [5.0, 8.0, 6.0, 9.0, 7.0, 10.0]);
        assert_eq!(
            (ts[3].shape.clone(), ts[3].data.clone()),
            (vec![], vec![7.0])
        );
        assert_eq!((ts[4].shape.clone(), ts[4].data.len()), (vec![0, 5], 0));
        assert_eq!(ts[5].data, [2.0, 3.0, 2.0, 3.0, 2.0, 3.0]);
    }

    #[test]
    fn other_float_dtypes_are_converted() {
        let f64s: Vec<u8> = [1.5f64, -2.25, 1e-3]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        // f16: 1.0, -2.0, 65504 (max), 2^-24 (smallest subnormal), +inf
        let f16s: Vec<u8> = [0x3c00u16, 0xc000, 0x7bff, 0x0001, 0x7c00]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        // bf16: 1.0, -3.0, 0.15625
        let bf16s: Vec<u8> = [0x3f80u16, 0xc040, 0x3e20]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let pk = state_dict_pickle(&[
            Spec {
                key: "d",
                dtype: "DoubleStorage",
                storage: "0",
                numel: 3,
                offset: 0,
                shape: &[3],
                stride: &[1],
            },
            Spec {
                key: "h",
                dtype: "HalfStorage",
                storage: "1",
                numel: 5,
                offset: 0,
                shape: &[5],
                stride: &[1],
            },
            Spec {
                key: "b",
                dtype: "BFloat16Storage",
                storage: "2",
                numel: 3,
                offset: 0,
                shape: &[3],
                stride: &[1],
            },
        ]);
        let bytes = checkpoint(&pk, &[("0", &f64s), ("1", &f16s), ("2", &bf16s)]);
        let ts = read_pth_bytes(&bytes, "dtypes.pth").unwrap();
        assert_eq!(ts[0].data, [1.5, -2.25, 1e-3f64 as f32]);
        assert_eq!(
            ts[1].data,
            [1.0, -2.0, 65504.0, 2f32.powi(-24), f32::INFINITY]
        );
        assert_eq!(ts[2].data, [1.0, -3.0, 0.15625]);
    }

    #[test]
    fn parameters_protocol4_opcodes_and_metadata_are_accepted() {
        // OrderedDict via STACK_GLOBAL + MEMOIZE, a _rebuild_parameter-wrapped tensor, a 7-arg
        // _rebuild_tensor_v2, LONG1 ints, and a BUILD with nested _metadata.
        let mut p = vec![0x80, 4, 0x95];
        p.extend_from_slice(&0u64.to_le_bytes());
        p.extend_from_slice(b"\x8c\x0bcollections\x94\x8c\x0bOrderedDict\x94\x93\x94)R\x94(");
        op_str(&mut p, "w");
        op_global(&mut p, "torch._utils", "_rebuild_parameter");
        p.push(b'(');
        op_global(&mut p, "torch._utils", "_rebuild_tensor_v2");
        p.extend_from_slice(b"((");
        op_str(&mut p, "storage");
        op_global(&mut p, "torch", "FloatStorage");
        op_str(&mut p, "7");
        op_str(&mut p, "cuda:0");
        p.extend_from_slice(
            b"\x8a\x01\x04tQK\x00K\x02K\x02\x86K\x01K\x02\x86\x88h\x02)RNtR\x88h\x02)RtRu",
        );
        p.push(b'}');
        op_str(&mut p, "_metadata");
        p.extend_from_slice(b"h\x02)R(");
        op_str(&mut p, "");
        p.push(b'}');
        op_str(&mut p, "version");
        p.extend_from_slice(b"K\x01s");
        op_str(&mut p, "lst");
        p.extend_from_slice(b"]\x88aG\x3f\xf0\x00\x00\x00\x00\x00\x000usb.");
        let bytes = checkpoint(&p, &[("7", &f32_bytes(&[1.0, 2.0, 3.0, 4.0]))]);
        let ts = read_pth_bytes(&bytes, "p4.pth").unwrap();
        assert_eq!(ts.len(), 1);
        assert_eq!(ts[0].shape, [2, 2]);
        assert_eq!(ts[0].data, [1.0, 3.0, 2.0, 4.0]);
    }

    // ----------------------------------------------------------------------------- errors

    #[test]
    fn garbage_inputs_are_errors() {
        assert!(read_err(b"").contains("not a zip archive"));
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for len in [1usize, 22, 100, 4096] {
            let bytes: Vec<u8> = (0..len).map(|_| xorshift(&mut x) as u8).collect();
            assert!(read_err(&bytes).contains("not a zip archive"));
        }
        let e = read_pth(Path::new("/nonexistent/dir/missing_model.pth")).unwrap_err();
        assert!(
            e.to_string()
                .contains("missing_model.pth: cannot read file"),
            "{e}"
        );
    }

    #[test]
    fn truncated_fixture_is_an_error() {
        let bytes = std::fs::read(fixture("model_10000.pth")).unwrap();
        for len in (0..bytes.len()).step_by(97) {
            let e = read_pth_bytes(&bytes[..len], "model_10000.pth").unwrap_err();
            assert!(e.to_string().starts_with("model_10000.pth: "), "{e}");
        }
    }

    #[test]
    fn structural_errors() {
        let data = f32_bytes(&[0.0; 10]);
        let good = state_dict_pickle(&[spec("w", 10, 0, &[2, 5], &[5, 1])]);
        read_pth_bytes(&checkpoint(&good, &[("0", &data)]), "ok.pth").unwrap();

        // No data.pkl.
        let z = make_zip(&[("arch/byteorder", b"little"), ("arch/data/0", &data)]);
        assert!(read_err(&z).contains("no <name>/data.pkl"));
        // Two data.pkl.
        let z = make_zip(&[("a/data.pkl", &good), ("b/data.pkl", &good)]);
        assert!(read_err(&z).contains("more than one data.pkl"));
        // Big-endian.
        let z = make_zip(&[
            ("a/data.pkl", &good),
            ("a/byteorder", b"big"),
            ("a/data/0", &data),
        ]);
        assert!(read_err(&z).contains("unsupported byte order"));
        // Missing storage record.
        assert!(read_err(&checkpoint(&good, &[])).contains("missing storage record 'arch/data/0'"));
        // Storage shorter than its declared numel.
        let m = read_err(&checkpoint(&good, &[("0", &data[..12])]));
        assert!(
            m.contains("truncated storage 'arch/data/0' (needs 40 bytes, has 12)"),
            "{m}"
        );
        // View out of bounds of its storage (offset 3 + 9 > 10).
        let pk = state_dict_pickle(&[spec("w", 10, 3, &[2, 5], &[5, 1])]);
        let m = read_err(&checkpoint(&pk, &[("0", &data)]));
        assert!(m.contains("tensor 'w': view (offset 3"), "{m}");
        // More elements than the storage holds (stride 0).
        let pk = state_dict_pickle(&[spec("w", 10, 0, &[4, 5], &[0, 1])]);
        assert!(read_err(&checkpoint(&pk, &[("0", &data)])).contains("its storage only 10"));
        // Huge shapes.
        let pk = state_dict_pickle(&[spec("w", 10, 0, &[1 << 16, 1 << 16], &[0, 0])]);
        assert!(read_err(&checkpoint(&pk, &[("0", &data)])).contains("more than 2^31"));
        let pk = state_dict_pickle(&[spec("w", u32::MAX, 0, &[2], &[1])]);
        assert!(read_err(&checkpoint(&pk, &[("0", &data)])).contains("limit exceeded"));
        // Unsupported dtype.
        let pk = state_dict_pickle(&[Spec {
            dtype: "LongStorage",
            ..spec("w", 10, 0, &[10], &[1])
        }]);
        let m = read_err(&checkpoint(&pk, &[("0", &data)]));
        assert!(
            m.contains("unsupported tensor dtype torch.LongStorage"),
            "{m}"
        );
        // A record marked as deflate-compressed (method field patched in both headers).
        let mut z = checkpoint(&good, &[("0", &data)]);
        assert_eq!(&z[..4], b"PK\x03\x04");
        z[8] = 8;
        let cd = z.windows(4).position(|w| w == b"PK\x01\x02").unwrap();
        z[cd + 10] = 8;
        let m = read_err(&z);
        assert!(m.contains("cannot read zip record 'arch/data.pkl'"), "{m}");
        // Stem differs from the file name: fine.
        let z = make_zip(&[
            ("some_other_stem/data.pkl", &good),
            ("some_other_stem/data/0", &data),
        ]);
        assert_eq!(read_pth_bytes(&z, "model.pth").unwrap()[0].shape, [2, 5]);
    }

    #[test]
    fn disallowed_globals_and_non_tensor_values() {
        let data = f32_bytes(&[0.0; 10]);
        // The classic: os.system('echo pwned').
        let mut p = vec![0x80, 2];
        op_global(&mut p, "os", "system");
        op_str(&mut p, "echo pwned");
        p.extend_from_slice(b"\x85R.");
        let m = read_err(&checkpoint(&p, &[]));
        assert!(m.contains("pickle references disallowed global 'os.system' (only tensors and ordered dicts are accepted)"), "{m}");
        // builtins.eval through STACK_GLOBAL.
        let mut p = vec![0x80, 4];
        op_str(&mut p, "builtins");
        op_str(&mut p, "eval");
        p.extend_from_slice(b"\x93.");
        assert!(read_err(&checkpoint(&p, &[])).contains("disallowed global 'builtins.eval'"));
        // A torch global that is not on the allow-list.
        let mut p = vec![0x80, 2];
        op_global(&mut p, "torch", "load");
        assert!(read_err(&checkpoint(&p, &[])).contains("disallowed global 'torch.load'"));
        // Top-level list.
        assert!(
            read_err(&checkpoint(b"\x80\x02]q\x00.", &[])).contains("top-level object is a list")
        );
        // Nested dict / int values; non-string keys; duplicate keys. A key with a newline keeps
        // the message on one line.
        let mut p = vec![0x80, 2, b'}', b'('];
        op_str(&mut p, "bad\nkey");
        p.extend_from_slice(b"}u.");
        let m = read_err(&checkpoint(&p, &[]));
        assert!(
            m.contains("entry 'bad\\nkey': value is a dict, expected a tensor"),
            "{m}"
        );
        assert!(
            read_err(&checkpoint(b"\x80\x02}K\x01K\x02s.", &[])).contains("key is not a string")
        );
        let mut pk =
            state_dict_pickle(&[spec("w", 10, 0, &[10], &[1]), spec("w", 10, 0, &[10], &[1])]);
        assert!(read_err(&checkpoint(&pk, &[("0", &data)])).contains("duplicate key"));
        // Malformed pickles.
        pk.truncate(pk.len() - 1);
        assert!(read_err(&checkpoint(&pk, &[("0", &data)])).contains("without STOP"));
        assert!(read_err(&checkpoint(b"\x80\x02s.", &[])).contains("stack underflow"));
        assert!(read_err(&checkpoint(b"\x80\x02h\x05.", &[])).contains("memo key 5"));
        assert!(read_err(&checkpoint(b"\x80\x02X\xff\xff\xff\xff", &[])).contains("truncated"));
        assert!(
            read_err(&checkpoint(b"\x80\x02I1\n.", &[])).contains("unsupported pickle opcode 0x49")
        );
        assert!(read_err(&checkpoint(b"\x80\x02(K\x01K\x02K\x03u}.", &[])).contains("odd number"));
    }

    #[test]
    fn deep_nesting_cycles_and_limits() {
        // 300k nested 1-tuples: no recursion anywhere (arena values), plain error at the end.
        let mut p = vec![0x80, 2, b'N'];
        p.extend(std::iter::repeat_n(0x85u8, 300_000));
        p.push(b'.');
        assert!(read_err(&checkpoint(&p, &[])).contains("top-level object is a tuple"));
        // A list that contains itself.
        assert!(read_err(&checkpoint(b"\x80\x02]q\x00h\x00a.", &[])).contains("is a list"));
        // A dict that contains itself as a value.
        let m = read_err(&checkpoint(b"\x80\x02}q\x00X\x01\x00\x00\x00kh\x00s.", &[]));
        assert!(m.contains("entry 'k': value is a dict"), "{m}");
        // Too many MARKs, too deep a stack.
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b'(', MAX_MARKS + 1));
        assert!(read_err(&checkpoint(&p, &[])).contains("limit exceeded"));
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b'N', MAX_STACK + 1));
        assert!(read_err(&checkpoint(&p, &[])).contains("limit exceeded"));
        // Huge declared lengths and memo indices cost nothing.
        let mut p = vec![0x80, 2, 0x8d];
        p.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(read_err(&checkpoint(&p, &[])).contains("truncated"));
        assert!(
            read_err(&checkpoint(
                b"\x80\x02Nr\xff\xff\xff\xffj\xff\xff\xff\xff.",
                &[]
            ))
            .contains("top-level object is None")
        );
        assert!(read_err(&checkpoint(b"\x80\x02\x8b\xff\xff\xff\x7f", &[])).contains("truncated"));
    }

    // ----------------------------------------------------------------------------- fuzzing

    fn xorshift(s: &mut u64) -> u64 {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s
    }

    fn mutate(buf: &mut Vec<u8>, rng: &mut u64) {
        let n = 1 + xorshift(rng) % 3;
        for _ in 0..n {
            let len = buf.len().max(1);
            let at = (xorshift(rng) as usize) % len;
            match xorshift(rng) % 7 {
                0 | 1 => {
                    for _ in 0..1 + xorshift(rng) % 4 {
                        let i = (xorshift(rng) as usize) % len;
                        if let Some(b) = buf.get_mut(i) {
                            *b ^= 1 << (xorshift(rng) % 8);
                        }
                    }
                }
                2 => {
                    const SPECIAL: [u8; 8] = [0, 0xff, 0x7f, 0x80, b'(', b'.', b'h', b'R'];
                    if let Some(b) = buf.get_mut(at) {
                        *b = if xorshift(rng).is_multiple_of(2) {
                            SPECIAL[(xorshift(rng) % 8) as usize]
                        } else {
                            xorshift(rng) as u8
                        };
                    }
                }
                3 => buf.truncate(at),
                4 => {
                    let k = 1 + (xorshift(rng) % 16) as usize;
                    let ins: Vec<u8> = (0..k).map(|_| xorshift(rng) as u8).collect();
                    let at = at.min(buf.len());
                    buf.splice(at..at, ins);
                }
                5 => {
                    let end = (at + 1 + (xorshift(rng) % 64) as usize).min(buf.len());
                    if at < end {
                        buf.drain(at..end);
                    }
                }
                _ => {
                    // Copy a span over another place (duplicates headers / opcodes).
                    let from = (xorshift(rng) as usize) % len;
                    let k = (1 + xorshift(rng) % 32) as usize;
                    let span: Vec<u8> = buf.iter().skip(from).take(k).copied().collect();
                    for (j, b) in span.into_iter().enumerate() {
                        if let Some(x) = buf.get_mut(at + j) {
                            *x = b;
                        }
                    }
                }
            }
        }
    }

    /// Reads `bytes`, asserting no panic and a well-formed result; true if Ok.
    fn read_no_panic(bytes: &[u8]) -> bool {
        let r = std::panic::catch_unwind(|| read_pth_bytes(bytes, "fuzz.pth"));
        match r {
            Err(_) => panic!("reader panicked on input {:02x?}", bytes),
            Ok(Ok(ts)) => {
                for t in &ts {
                    assert_eq!(t.data.len(), t.shape.iter().product::<usize>());
                }
                true
            }
            Ok(Err(e)) => {
                let m = e.to_string();
                assert!(m.starts_with("fuzz.pth: ") && !m.contains('\n'), "{m}");
                false
            }
        }
    }

    /// Iterations: the given default, or `PTH_FUZZ_ITERS` for longer local runs (the runtime
    /// limit is only asserted for the default).
    fn fuzz_iters(default: usize) -> (usize, bool) {
        match std::env::var("PTH_FUZZ_ITERS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            Some(n) => (n, false),
            None => (default, true),
        }
    }

    #[test]
    fn fuzz_mutated_fixture_never_panics() {
        let start = std::time::Instant::now();
        let orig = std::fs::read(fixture("model_10000.pth")).unwrap();
        let (iters, timed) = fuzz_iters(3000);
        let mut rng = 0x2545f4914f6cdd1d_u64;
        let mut ok = 0;
        for _ in 0..iters {
            let mut buf = orig.clone();
            mutate(&mut buf, &mut rng);
            ok += read_no_panic(&buf) as usize;
        }
        let secs = start.elapsed().as_secs_f64();
        eprintln!("whole-file fuzz: {iters} cases, {ok} read Ok, {secs:.2} s");
        assert!(!timed || secs < 20.0, "fuzz took {secs} s");
    }

    /// Mutates data.pkl (and sometimes a storage) and re-zips with valid CRCs, so that the
    /// mutations reach the pickle interpreter and the view checks instead of the zip CRC check.
    #[test]
    fn fuzz_mutated_pickle_never_panics() {
        let start = std::time::Instant::now();
        let orig = std::fs::read(fixture("model_10000.pth")).unwrap();
        let mut z = zip::ZipArchive::new(std::io::Cursor::new(&orig[..])).unwrap();
        let mut records: Vec<(String, Vec<u8>)> = Vec::new();
        for i in 0..z.len() {
            let mut f = z.by_index(i).unwrap();
            let mut v = Vec::new();
            f.read_to_end(&mut v).unwrap();
            records.push((f.name().unwrap().to_string(), v));
        }
        let pkl = records
            .iter()
            .position(|(n, _)| n.ends_with("/data.pkl"))
            .unwrap();
        let (iters, timed) = fuzz_iters(2000);
        let mut rng = 0x853c49e6748fea9b_u64;
        let mut ok = 0;
        for i in 0..iters {
            let mut recs = records.clone();
            mutate(&mut recs[pkl].1, &mut rng);
            if i % 5 == 0 {
                let j = (xorshift(&mut rng) as usize) % recs.len();
                mutate(&mut recs[j].1, &mut rng);
            }
            let refs: Vec<(&str, &[u8])> = recs.iter().map(|(n, d)| (n.as_str(), &d[..])).collect();
            ok += read_no_panic(&make_zip(&refs)) as usize;
        }
        let secs = start.elapsed().as_secs_f64();
        eprintln!("pickle fuzz: {iters} cases, {ok} read Ok, {secs:.2} s");
        assert!(ok > 0 && ok < iters);
        assert!(!timed || secs < 20.0, "fuzz took {secs} s");
    }
}
