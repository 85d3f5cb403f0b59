# timeout: 5
step sleeping
sleep 100
