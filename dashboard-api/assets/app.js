// telemon ward dashboard: login, ward tiles with live vitals, alert banner, patient charts.
// Talks to /api/v1 with the session token kept in sessionStorage (gone with the tab).
'use strict';

const VITALS = [
  ['heart_rate', 'Pulse', '/min'],
  ['respiratory_rate', 'Resp', '/min'],
  ['spo2', 'SpO2', '%'],
  ['systolic_bp', 'Sys BP', 'mmHg'],
  ['temperature', 'Temp', '°C'],
  ['consciousness', 'ACVPU', ''],
];
const RANGES = { '15m': 900, '1h': 3600, '6h': 21600, '24h': 86400 };
// Consciousness arrives as a code (0 alert, 1 new confusion, 2 voice, 3 pain, 4 unresponsive)
// or as the letter itself; the ward reads the letter.
const ACVPU = ['A', 'C', 'V', 'P', 'U'];
const display = (metric, v) => {
  if (v == null) return '–';
  if (metric === 'consciousness' && typeof v === 'number') return ACVPU[v] ?? String(v);
  return String(v);
};
const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') node.className = v; else if (k.startsWith('on')) node[k] = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
};

const state = { token: sessionStorage.getItem('token'), alerts: new Map(), stream: null,
  onReading: null };

async function api(path, options = {}) {
  const headers = { 'content-type': 'application/json' };
  if (state.token) headers.authorization = 'Bearer ' + state.token;
  const resp = await fetch('/api/v1' + path, { ...options, headers });
  if (resp.status === 401 && path !== '/login') { logout(); throw new Error('session ended'); }
  const body = resp.status === 204 || resp.status === 202 ? null : await resp.json();
  if (!resp.ok) throw Object.assign(new Error(body && body.error || resp.statusText),
    { status: resp.status });
  return body;
}

// NEWS2 (RCP 2017) from the newest values; null when a needed value is missing.
function news2(v, scale) {
  const band = (x, table) => table.find(([max]) => x <= max)[1];
  const parts = [];
  if (v.respiratory_rate != null) parts.push(band(v.respiratory_rate,
    [[8, 3], [11, 1], [20, 0], [24, 2], [Infinity, 3]]));
  const o2 = v.supplemental_oxygen ? 1 : 0;
  if (v.spo2 != null) {
    const s = v.spo2;
    if (scale === 2) parts.push(s <= 83 ? 3 : s <= 85 ? 2 : s <= 87 ? 1 : s <= 92 || !o2 ? 0
      : s <= 94 ? 1 : s <= 96 ? 2 : 3);
    else parts.push(band(s, [[91, 3], [93, 2], [95, 1], [Infinity, 0]]));
  }
  parts.push(o2 ? 2 : 0);
  if (v.systolic_bp != null) parts.push(band(v.systolic_bp,
    [[90, 3], [100, 2], [110, 1], [219, 0], [Infinity, 3]]));
  if (v.heart_rate != null) parts.push(band(v.heart_rate,
    [[40, 3], [50, 1], [90, 0], [110, 1], [130, 2], [Infinity, 3]]));
  if (v.consciousness != null) parts.push(v.consciousness > 0 ? 3 : 0);
  if (v.temperature != null) parts.push(band(v.temperature,
    [[35.0, 3], [36.0, 1], [38.0, 0], [39.0, 1], [Infinity, 2]]));
  return parts.length > 1 ? parts.reduce((a, b) => a + b, 0) : null;
}

function logout() {
  if (state.token) api('/logout', { method: 'POST' }).catch(() => {});
  state.token = null;
  sessionStorage.removeItem('token');
  stopStream();
  location.hash = '#/login';
}

// SSE read with fetch, so the token travels in a header rather than the URL.
function startStream(query, onEvent) {
  stopStream();
  const controller = new AbortController();
  state.stream = controller;
  (async () => {
    let lastId = null;
    while (!controller.signal.aborted) {
      try {
        const headers = { authorization: 'Bearer ' + state.token };
        if (lastId) headers['last-event-id'] = lastId;
        const resp = await fetch('/api/v1/stream' + query, { headers, signal: controller.signal });
        if (resp.status === 401) { logout(); return; }
        if (!resp.ok) throw new Error('stream ' + resp.status);
        const reader = resp.body.getReader();
        const decoder = new TextDecoder();
        let buffer = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let end;
          while ((end = buffer.indexOf('\n\n')) >= 0) {
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            const field = (name) => (block.split('\n').find((l) => l.startsWith(name + ': '))
              || '').slice(name.length + 2);
            if (field('id')) lastId = field('id');
            const name = field('event');
            if (name === 'reading' || name === 'alert') onEvent(name, JSON.parse(field('data')));
            // The session ended or expired while the stream was open: back to the login page.
            if (name === 'end') { logout(); return; }
          }
        }
      } catch (e) {
        if (controller.signal.aborted) return;
      }
      await new Promise((r) => setTimeout(r, 1000));
    }
  })();
}

function stopStream() {
  if (state.stream) state.stream.abort();
  state.stream = null;
}

function renderBanner() {
  const banner = $('#banner');
  const active = [...state.alerts.values()]
    .filter((a) => a.state === 'firing' || a.state === 'pending' || a.state === 'acknowledged');
  banner.hidden = active.length === 0;
  banner.replaceChildren(...active.map((a) => el('div',
    { class: 'alert ' + a.state, 'data-alert': a.id },
    el('strong', {}, a.priority.toUpperCase()), el('span', {}, `${a.subject}: ${a.message}`),
    el('span', { class: 'alert-state' }, a.state + (a.acknowledged_by ? ' by '
      + a.acknowledged_by : '')),
    a.state === 'acknowledged' ? '' : el('button', { class: 'ack', onclick: async (ev) => {
      ev.target.disabled = true;
      try { await api(`/alerts/${encodeURIComponent(a.id)}/ack`, { method: 'POST' }); }
      catch (e) { ev.target.disabled = false; alert(e.message); }
    } }, 'Acknowledge'))));
}

function onAlert(a) {
  if (a.state === 'resolved') state.alerts.delete(a.id); else state.alerts.set(a.id, a);
  renderBanner();
}

async function loadAlerts() {
  state.alerts.clear();
  for (const a of await api('/alerts?active=true')) state.alerts.set(a.id, a);
  renderBanner();
}

function loginView() {
  stopStream();
  $('#banner').hidden = true;
  const error = el('p', { class: 'error' });
  const form = el('form', { class: 'login' },
    el('h1', {}, 'Sign in'),
    el('input', { name: 'user', placeholder: 'User', autocomplete: 'username', required: '' }),
    el('input', { name: 'password', type: 'password', placeholder: 'Password',
      autocomplete: 'current-password', required: '' }),
    el('button', { type: 'submit' }, 'Sign in'), error);
  form.onsubmit = async (ev) => {
    ev.preventDefault();
    try {
      const body = JSON.stringify({ user: form.user.value, password: form.password.value });
      const session = await api('/login', { method: 'POST', body });
      state.token = session.token;
      sessionStorage.setItem('token', session.token);
      location.hash = '#/ward';
    } catch (e) {
      error.textContent = e.status === 429 ? 'Too many attempts; wait and try again.'
        : 'Wrong user name or password.';
    }
  };
  return form;
}

async function wardView() {
  const [patients, devices] = await Promise.all([api('/patients'), api('/devices')]);
  const online = new Map(devices.map((d) => [d.id, d.online]));
  const tiles = new Map();
  const grid = el('div', { class: 'tiles' });
  for (const p of patients) {
    const values = {};
    const tile = el('a', { class: 'tile', href: `#/patient/${encodeURIComponent(p.id)}`,
      'data-patient': p.id });
    const render = () => {
      const score = news2(values, p.spo2_scale);
      const alerts = [...state.alerts.values()].filter((a) => a.subject === p.id
        || p.devices.includes(a.subject));
      const worst = ['high', 'medium', 'low'].find((x) => alerts.some((a) => a.priority === x));
      tile.className = 'tile' + (worst ? ' alert-' + worst : '');
      const deviceState = p.devices.map((d) => el('span',
        { class: online.get(d) === false ? 'offline' : 'online' },
        `${d} ${online.get(d) === false ? 'offline' : 'online'} `));
      tile.replaceChildren(el('h2', {}, p.name),
        el('div', { class: 'meta' }, `${p.id} · ward ${p.ward || '-'} · `, ...deviceState),
        el('div', { class: 'vitals' }, ...VITALS.map(([m, label, unit]) => el('div',
          { class: 'vital', 'data-metric': m },
          el('small', {}, label), el('b', {}, display(m, values[m])),
          el('small', {}, unit)))),
        el('div', { class: 'news2' }, 'NEWS2 ' + (score == null ? '–' : score)),
        el('div', { class: 'meta' }, alerts.length ? `${alerts.length} active alert(s)`
          : 'no active alerts'));
    };
    tiles.set(p.id, { p, values, render });
    for (const r of await api(`/patients/${encodeURIComponent(p.id)}/latest`)) {
      values[r.metric] = r.value;
    }
    render();
    grid.append(tile);
  }
  await loadAlerts();
  const byDevice = new Map();
  for (const t of tiles.values()) for (const d of t.p.devices) byDevice.set(d, t);
  startStream('', (kind, data) => {
    if (kind === 'alert') { onAlert(data); tiles.forEach((t) => t.render()); return; }
    const t = byDevice.get(data.device_id);
    if (t) { t.values[data.metric] = data.value; t.render(); }
  });
  tiles.forEach((t) => t.render());
  return el('div', {}, el('h1', {}, 'Ward'), patients.length ? grid
    : el('p', {}, 'No patients assigned to you.'));
}

async function patientView(id) {
  let patient;
  try { patient = await api(`/patients/${encodeURIComponent(id)}`); } catch (e) {
    stopStream();
    return el('p', { class: 'error', id: 'denied' },
      'Patient not found, or not assigned to you.');
  }
  const range = sessionStorage.getItem('range') || '1h';
  const select = el('select', { id: 'range' }, ...Object.keys(RANGES).map((r) => {
    const o = el('option', { value: r }, r); if (r === range) o.selected = true; return o; }));
  select.onchange = () => { sessionStorage.setItem('range', select.value); route(); };
  const charts = el('div', { class: 'charts' });
  const view = el('div', {}, el('h1', {}, `${patient.name} (${patient.id})`),
    el('p', {}, 'Range ', select), charts);
  const from = new Date(Date.now() - RANGES[range] * 1000).toISOString();
  const series = new Map();
  for (const [metric, label, unit] of VITALS) {
    const points = [];
    for (const d of patient.devices) {
      const q = `?metric=${metric}&from=${encodeURIComponent(from)}&limit=10000`;
      for (const r of await api(`/devices/${encodeURIComponent(d)}/readings${q}`)) {
        if (typeof r.value === 'number') points.push([Date.parse(r.time) / 1000, r.value]);
      }
    }
    points.sort((a, b) => a[0] - b[0]);
    const box = el('div', { class: 'chart', 'data-metric': metric });
    charts.append(box);
    const data = [points.map((p) => p[0]), points.map((p) => p[1])];
    const plot = new uPlot({ title: `${label} (${unit})`, width: 800, height: 180,
      series: [{}, { label, stroke: '#1b6ec2', width: 2 }] }, data, box);
    series.set(metric, { data, plot, box });
  }
  await loadAlerts();
  startStream(`?patient=${encodeURIComponent(patient.id)}`, (kind, data) => {
    if (kind === 'alert') return onAlert(data);
    const s = series.get(data.metric);
    if (!s || typeof data.value !== 'number') return;
    s.data[0].push(Date.parse(data.time) / 1000);
    s.data[1].push(data.value);
    const cutoff = Date.now() / 1000 - RANGES[range];
    while (s.data[0].length && s.data[0][0] < cutoff) { s.data[0].shift(); s.data[1].shift(); }
    s.plot.setData(s.data);
    s.box.setAttribute('data-last', String(data.value));
  });
  return view;
}

async function route() {
  const hash = location.hash || '#/ward';
  if (!state.token && hash !== '#/login') { location.hash = '#/login'; return; }
  $('#logout').hidden = !state.token;
  let view;
  try {
    if (hash === '#/login') view = loginView();
    else if (hash.startsWith('#/patient/')) {
      view = await patientView(decodeURIComponent(hash.slice('#/patient/'.length)));
    } else view = await wardView();
  } catch (e) {
    view = el('p', { class: 'error' }, e.message);
  }
  $('#view').replaceChildren(view);
  if (state.token) api('/me').then((me) => { $('#who').textContent = `${me.name} (${me.role})`; })
    .catch(() => {});
}

$('#logout').onclick = logout;
window.addEventListener('hashchange', route);
route();
