// Accessibility checks run in the page by tests/browser/pages.py (through
// page.evaluate, which the console's Content-Security-Policy does not block). Each
// check is a function of no argument returning what it found; pages.py calls it by name.

// "rgb(r, g, b)" / "rgba(r, g, b, a)" -> [r, g, b, a]
const parse = (text) => {
  const m = text.match(/rgba?\(([^)]+)\)/);
  if (!m) { return null; }
  const p = m[1].split(/[ ,/]+/).filter(Boolean).map(Number);
  return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1];
};

// colour `top` (with its alpha) over the opaque colour `under`
const over = (top, under) => {
  const a = top[3];
  return [0, 1, 2].map((i) => top[i] * a + under[i] * (1 - a)).concat([1]);
};

// WCAG 2 relative luminance and contrast ratio
const lum = (c) => {
  const f = (v) => {
    v /= 255;
    return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4);
  };
  return 0.2126 * f(c[0]) + 0.7152 * f(c[1]) + 0.0722 * f(c[2]);
};
const ratio = (a, b) => {
  const la = lum(a);
  const lb = lum(b);
  return (Math.max(la, lb) + 0.05) / (Math.min(la, lb) + 0.05);
};

// the colour behind `el`: the backgrounds from it up to the root, blended over white
const behind = (el) => {
  const layers = [];
  for (let e = el; e && e.nodeType === 1; e = e.parentElement) {
    const bg = parse(getComputedStyle(e).backgroundColor);
    if (bg && bg[3] > 0) {
      layers.push(bg);
      if (bg[3] >= 1) { break; }
    }
  }
  let color = [255, 255, 255, 1];
  for (let i = layers.length - 1; i >= 0; i--) { color = over(layers[i], color); }
  return color;
};

// rendered, on screen, larger than the 1-px boxes of visually hidden text
const visible = (el) => {
  const r = el.getBoundingClientRect();
  const s = getComputedStyle(el);
  return r.width > 1 && r.height > 1 && r.right > 0 && r.bottom > 0
    && s.visibility !== "hidden" && s.display !== "none";
};

const hex = (c) => "#" + c.slice(0, 3)
  .map((v) => Math.round(v).toString(16).padStart(2, "0")).join("");

const describe = (el) => {
  const cls = typeof el.className === "string" && el.className.trim()
    ? "." + el.className.trim().replace(/\s+/g, ".") : "";
  return el.tagName.toLowerCase() + (el.id ? "#" + el.id : "") + cls;
};

// visible form controls without a label, links and buttons without a name, the page's
// language and its one <h1>
function unlabelled() {
  const bad = [];
  document.querySelectorAll("input:not([type=hidden]), select, textarea").forEach((el) => {
    if (!visible(el)) { return; }
    const named = (el.labels && el.labels.length) || el.getAttribute("aria-label")
      || el.getAttribute("aria-labelledby");
    if (!named) { bad.push("no label: " + describe(el) + " name=" + el.name); }
  });
  document.querySelectorAll("a[href], button, summary").forEach((el) => {
    if (!visible(el)) { return; }
    const name = (el.getAttribute("aria-label") || el.textContent || "").trim();
    if (!name) { bad.push("no name: " + describe(el)); }
  });
  if (!document.documentElement.lang) { bad.push("no lang on <html>"); }
  if (document.querySelectorAll("h1").length !== 1) { bad.push("not exactly one <h1>"); }
  return bad;
}

// visible texts (form values and placeholders too) below WCAG AA contrast: 4.5:1, or
// 3:1 for large text (24 px, or 18.66 px bold)
function lowContrast() {
  const bad = [];
  const check = (el, fgText, what, text) => {
    const s = getComputedStyle(el);
    const size = parseFloat(s.fontSize);
    const large = size >= 24 || (size >= 18.66 && Number(s.fontWeight) >= 700);
    const need = large ? 3 : 4.5;
    const bg = behind(el);
    const fg0 = parse(fgText);
    if (!fg0) { return; }
    const fg = over(fg0, bg);
    const r = ratio(fg, bg);
    if (r < need) {
      bad.push(`${what} ${JSON.stringify(text.slice(0, 40))} in ${describe(el)}: `
        + `${hex(fg)} on ${hex(bg)} = ${r.toFixed(2)} < ${need}`);
    }
  };
  document.querySelectorAll("body *").forEach((el) => {
    if (!visible(el) || ["SCRIPT", "STYLE"].includes(el.tagName)) { return; }
    const own = Array.from(el.childNodes).filter((n) => n.nodeType === 3)
      .map((n) => n.textContent).join("").trim();
    if (own) { check(el, getComputedStyle(el).color, "text", own); }
    if (el.matches("input:not([type=hidden]):not([type=checkbox]), textarea")) {
      if (el.value) { check(el, getComputedStyle(el).color, "value", el.value); }
      if (el.placeholder) {
        check(el, getComputedStyle(el, "::placeholder").color, "placeholder",
          el.placeholder);
      }
    }
  });
  return bad;
}

// the focused element: a stable id for it (the order it was first reached in), its
// index among focusable() (if it is one), and its focus ring (style, width, contrast
// with the colour around it)
function focused() {
  const el = document.activeElement;
  if (!el || el === document.body || el === document.documentElement) { return null; }
  const s = getComputedStyle(el);
  const width = parseFloat(s.outlineWidth) || 0;
  const ring = parse(s.outlineColor);
  const around = behind(el.parentElement || el);
  const r = (s.outlineStyle !== "none" && ring) ? ratio(over(ring, around), around) : 0;
  if (!el.hasAttribute("data-a11y-seen")) {
    const n = document.querySelectorAll("[data-a11y-seen]").length;
    el.setAttribute("data-a11y-seen", String(n));
  }
  const label = (el.getAttribute("aria-label") || el.textContent || el.name || "").trim();
  return {
    id: el.getAttribute("data-a11y-seen"),
    stop: el.getAttribute("data-a11y-stop"),
    what: describe(el) + " " + JSON.stringify(label.slice(0, 30)),
    width: width,
    ratio: r,
    style: s.outlineStyle,
  };
}

// the visible elements Tab should stop at, each marked with its index
function focusable() {
  const selector = "a[href], button, input:not([type=hidden]), select, textarea, summary, "
    + "[tabindex]";
  return Array.from(document.querySelectorAll(selector))
    .filter((el) => visible(el) && el.tabIndex >= 0 && !el.disabled)
    .map((el, i) => {
      el.setAttribute("data-a11y-stop", String(i));
      return describe(el);
    });
}
