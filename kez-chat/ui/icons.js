// Line icons as inline SVG built with createElementNS (static shapes, no markup parsing), so the
// UI does not depend on an emoji font being installed.
const NS = 'http://www.w3.org/2000/svg';

// 24×24 stroke drawings: each an array of path `d` strings (and c:cx,cy,r for circles).
const SHAPES = {
  search: ['M11 4a7 7 0 1 1 0 14a7 7 0 0 1 0-14z', 'M16.5 16.5L21 21'],
  plus: ['M12 5v14', 'M5 12h14'],
  moon: ['M20 14.5A8 8 0 0 1 9.5 4a8 8 0 1 0 10.5 10.5z'],
  sun: ['M12 8a4 4 0 1 1 0 8a4 4 0 0 1 0-8z', 'M12 2v2', 'M12 20v2', 'M4.9 4.9l1.4 1.4', 'M17.7 17.7l1.4 1.4', 'M2 12h2', 'M20 12h2', 'M4.9 19.1l1.4-1.4', 'M17.7 6.3l1.4-1.4'],
  menu: ['M4 6h16', 'M4 12h16', 'M4 18h16'],
  attach: ['M21 11.5l-8.6 8.6a5.5 5.5 0 0 1-7.8-7.8l8.6-8.6a3.7 3.7 0 0 1 5.2 5.2l-8.6 8.6a1.8 1.8 0 0 1-2.6-2.6l8-8'],
  send: ['M4 12l16-8-6 16-3-7z', 'M11 13l9-9'],
  back: ['M15 5l-7 7 7 7'],
  info: ['M12 3a9 9 0 1 1 0 18a9 9 0 0 1 0-18z', 'M12 11v6', 'M12 7.5v.5'],
  folder: ['M3 7a2 2 0 0 1 2-2h4l2 2h8a2 2 0 0 1 2 2v8a2 2 0 0 1-2 2H5a2 2 0 0 1-2-2z'],
  upload: ['M12 16V4', 'M7 9l5-5 5 5', 'M4 16v3a1 1 0 0 0 1 1h14a1 1 0 0 0 1-1v-3'],
  file: ['M6 3h8l5 5v12a1 1 0 0 1-1 1H6a1 1 0 0 1-1-1V4a1 1 0 0 1 1-1z', 'M14 3v5h5'],
  close: ['M6 6l12 12', 'M18 6L6 18'],
  more: ['M6 12h.01', 'M12 12h.01', 'M18 12h.01'],
  reply: ['M10 8L5 12l5 4', 'M5 12h9a5 5 0 0 1 5 5v1'],
  edit: ['M4 20h4L19 9l-4-4L4 16z', 'M13.5 6.5l4 4'],
  warn: ['M12 3l10 18H2z', 'M12 10v5', 'M12 18v.5'],
  lock: ['M6 11h12v9H6z', 'M8.5 11V8a3.5 3.5 0 0 1 7 0v3'],
  timer: ['M12 7a7 7 0 1 1 0 14a7 7 0 0 1 0-14z', 'M12 10.5V14l2 1.5', 'M9.5 3h5'],
};

/** An icon (decorative: aria-hidden; the button around it carries the label). */
export function icon(name, { size = 20, className = '' } = {}) {
  const svg = document.createElementNS(NS, 'svg');
  svg.setAttribute('viewBox', '0 0 24 24');
  svg.setAttribute('width', String(size));
  svg.setAttribute('height', String(size));
  svg.setAttribute('aria-hidden', 'true');
  svg.setAttribute('focusable', 'false');
  svg.setAttribute('class', `icon ${className}`.trim());
  for (const d of SHAPES[name] || []) {
    const p = document.createElementNS(NS, 'path');
    p.setAttribute('d', d);
    svg.append(p);
  }
  return svg;
}
